package key

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

func TestLoadOrCreate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	k1, created, err := LoadOrCreate(dir)
	if err != nil || !created {
		t.Fatalf("LoadOrCreate(new dir) = created %v, %v; want created", created, err)
	}
	fi, err := os.Stat(filepath.Join(dir, FileName))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("key file mode = %#o, want 0600", fi.Mode().Perm())
	}
	if di, _ := os.Stat(dir); di.Mode().Perm() != 0o700 {
		t.Errorf("state dir mode = %#o, want 0700", di.Mode().Perm())
	}
	k2, created, err := LoadOrCreate(dir)
	if err != nil || created || k2 != k1 {
		t.Fatalf("LoadOrCreate(again) = same %v, created %v, %v; want the stored key", k2 == k1, created, err)
	}
	k3, err := Rotate(dir)
	if err != nil || k3 == k1 {
		t.Fatalf("Rotate = changed %v, %v; want a new key", k3 != k1, err)
	}
	k4, _, err := LoadOrCreate(dir)
	if err != nil || k4 != k3 {
		t.Fatalf("LoadOrCreate(after Rotate) = rotated key %v, %v", k4 == k3, err)
	}
	if fi, _ := os.Stat(filepath.Join(dir, FileName)); fi.Mode().Perm() != 0o600 {
		t.Errorf("rotated key file mode = %#o, want 0600", fi.Mode().Perm())
	}
}

func TestLoadRefuses(t *testing.T) {
	good, _ := wgtypes.GeneratePrivateKey()
	tests := []struct {
		name    string
		content string
		mode    os.FileMode
		setup   func(t *testing.T, path string) // replaces the file written from content/mode
		want    string
	}{
		{name: "group readable", content: good.String() + "\n", mode: 0o640, want: "allows group or other access"},
		{name: "world readable", content: good.String(), mode: 0o604, want: "allows group or other access"},
		{name: "empty", content: "", mode: 0o600, want: "0 characters"},
		{name: "short", content: good.String()[:43], mode: 0o600, want: "43 characters"},
		{name: "two keys", content: good.String() + "\n" + good.String() + "\n", mode: 0o600, want: "characters"},
		{name: "not base64", content: strings.Repeat("!", 43) + "=", mode: 0o600, want: "not standard base64"},
		{name: "unpadded 33 bytes", content: strings.Repeat("A", 44), mode: 0o600, want: "not standard base64"},
		{name: "all zero", content: wgtypes.Key{}.String(), mode: 0o600, want: "all zero"},
		{name: "symlink", setup: func(t *testing.T, path string) {
			other := filepath.Join(t.TempDir(), "k")
			if err := os.WriteFile(other, []byte(good.String()), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(other, path); err != nil {
				t.Fatal(err)
			}
		}, want: "not a regular file"},
		{name: "writable directory", content: good.String(), mode: 0o600, setup: func(t *testing.T, path string) {
			if err := os.WriteFile(path, []byte(good.String()), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(filepath.Dir(path), 0o777); err != nil {
				t.Fatal(err)
			}
		}, want: "lets group or others replace the key"},
		{name: "foreign owner", content: good.String(), mode: 0o600, setup: func(t *testing.T, path string) {
			if os.Geteuid() != 0 {
				t.Skip("chown needs root")
			}
			if err := os.WriteFile(path, []byte(good.String()), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chown(path, 65534, 65534); err != nil {
				t.Fatal(err)
			}
		}, want: "owned by uid 65534"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, FileName)
			if tt.setup != nil {
				tt.setup(t, path)
			} else {
				if err := os.WriteFile(path, []byte(tt.content), tt.mode); err != nil {
					t.Fatal(err)
				}
				if err := os.Chmod(path, tt.mode); err != nil { // past the umask
					t.Fatal(err)
				}
			}
			_, created, err := LoadOrCreate(dir)
			if err == nil || created || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("LoadOrCreate = created %v, %v; want an error with %q", created, err, tt.want)
			}
			if strings.Contains(err.Error(), good.String()) {
				t.Errorf("error %q shows the key", err)
			}
		})
	}
	t.Run("insecure is ErrInsecure", func(t *testing.T) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, FileName), []byte(good.String()), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(filepath.Join(dir, FileName), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, _, err := LoadOrCreate(dir); !errors.Is(err, ErrInsecure) {
			t.Fatalf("LoadOrCreate(0644) = %v, want ErrInsecure", err)
		}
	})
}

func TestLoadPSK(t *testing.T) {
	psk, _ := wgtypes.GenerateKey()
	dir := t.TempDir()
	// A Kubernetes Secret volume: the file is a symlink into a ..data directory.
	data := filepath.Join(dir, "..data")
	if err := os.Mkdir(data, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(data, "psk"), []byte(psk.String()+"\n"), 0o400); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "psk")
	if err := os.Symlink(filepath.Join("..data", "psk"), link); err != nil {
		t.Fatal(err)
	}
	got, err := LoadPSK(link)
	if err != nil || got != psk {
		t.Fatalf("LoadPSK(symlink to 0400 file) = equal %v, %v", got == psk, err)
	}
	if err := os.Chmod(filepath.Join(data, "psk"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadPSK(link); !errors.Is(err, ErrInsecure) {
		t.Fatalf("LoadPSK(0644) = %v, want ErrInsecure", err)
	}
	if _, err := LoadPSK(filepath.Join(dir, "missing")); err == nil || !strings.Contains(err.Error(), "pre-shared key") {
		t.Fatalf("LoadPSK(missing) = %v, want an error naming the pre-shared key", err)
	}
}

func TestParsePublic(t *testing.T) {
	priv, _ := wgtypes.GeneratePrivateKey()
	pub := priv.PublicKey()
	tests := []struct {
		in   string
		ok   bool
		want string
	}{
		{in: pub.String(), ok: true},
		{in: "", want: "0 characters"},
		{in: " " + pub.String()[1:], want: "not standard base64"},
		{in: pub.String() + "\n", want: "45 characters"},
		// URL-safe alphabet (a random key need not contain + or /, so put one in).
		{in: pub.String()[:10] + "-" + pub.String()[11:], want: "not standard base64"},
		{in: pub.String()[:10] + "_" + pub.String()[11:], want: "not standard base64"},
		{in: wgtypes.Key{}.String(), want: "all zero"},
		{in: strings.Repeat("A", 44), want: "not standard base64"},
		{in: strings.Repeat("A", 43) + "=", want: "all zero"},
		{in: "hello", want: "5 characters"},
	}
	for _, tt := range tests {
		got, err := ParsePublic(tt.in)
		if tt.ok {
			if err != nil || got != pub {
				t.Errorf("ParsePublic(%q) = %v, %v; want the key", tt.in, got, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("ParsePublic(%q) = %v; want an error with %q", tt.in, err, tt.want)
		}
	}
}

func FuzzParsePublic(f *testing.F) {
	f.Add("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
	f.Add(strings.Repeat("A", 44))
	f.Fuzz(func(t *testing.T, s string) {
		k, err := ParsePublic(s)
		if err == nil && k.String() != s {
			t.Fatalf("ParsePublic(%q) accepted a key that prints as %q", s, k.String())
		}
	})
}
