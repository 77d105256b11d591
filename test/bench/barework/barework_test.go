package barework

import (
	"net/netip"
	"testing"
)

func TestAddr(t *testing.T) {
	sub := netip.MustParsePrefix("10.247.0.0/22")
	tests := []struct {
		idx     int
		want    string
		wantErr bool
	}{
		{0, "10.247.0.2/22", false},
		{254, "10.247.1.0/22", false},
		{1020, "10.247.3.254/22", false},
		{1021, "", true},
		{-1, "", true},
	}
	for _, tt := range tests {
		got, err := Addr(sub, tt.idx)
		if (err != nil) != tt.wantErr || (err == nil && got.String() != tt.want) {
			t.Errorf("Addr(%s, %d) = %v, %v; want %s (error %t)", sub, tt.idx, got, err, tt.want, tt.wantErr)
		}
	}
	if gw := Gateway(sub); gw.String() != "10.247.0.1" {
		t.Errorf("Gateway = %s", gw)
	}
	sub6 := netip.MustParsePrefix("fd00:247::/64")
	if got, err := Addr(sub6, 1020); err != nil || got.String() != "fd00:247::3fe/64" {
		t.Errorf("Addr(%s, 1020) = %v, %v; want fd00:247::3fe/64", sub6, got, err)
	}
	if gw := Gateway(sub6); gw.String() != "fd00:247::1" {
		t.Errorf("Gateway(%s) = %s", sub6, gw)
	}
}
