// Package key keeps a node's WireGuard private key: generated on first start, stored in the
// agent's state directory readable by its owner only, loaded on every later start, replaced
// on rotation. Only the public key leaves the node (in its lease or Node annotation).
//
// A key file that is not a regular file owned by us with no group or other access, or whose
// content is not exactly one base64 key, is refused rather than repaired: either means
// someone else touched it, and silently replacing it would change the node's identity.
package key

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"github.com/netagent/netagent/pkg/atomicfile"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// FileName is the private key's file in the state directory.
const FileName = "wireguard.key"

// ErrInsecure is returned for a key file others could read or write.
var ErrInsecure = errors.New("insecure key file")

// LoadOrCreate returns the private key stored in dir, creating dir (0700) and the key (0600)
// when there is none yet; created says which.
func LoadOrCreate(dir string) (k wgtypes.Key, created bool, err error) {
	path := filepath.Join(dir, FileName)
	k, err = loadPrivate(path)
	if err == nil {
		return k, false, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return wgtypes.Key{}, false, err
	}
	k, err = write(dir)
	return k, err == nil, err
}

// Rotate replaces the private key in dir with a new one and returns it. The old key is
// gone once it returns: peers must learn the new public key before they talk to us again.
func Rotate(dir string) (wgtypes.Key, error) {
	return write(dir)
}

// LoadPSK reads a pre-shared key (base64, as `wg genpsk` writes it) from path. The path may
// be a symlink (a mounted Kubernetes Secret is one); the file it names must not be readable
// by group or others (a Secret volume needs defaultMode 0400).
func LoadPSK(path string) (wgtypes.Key, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("pre-shared key: %w", err)
	}
	if err := checkFile(path, fi); err != nil {
		return wgtypes.Key{}, fmt.Errorf("pre-shared key: %w", err)
	}
	return readKey(path)
}

// ParsePublic parses a public key read from the store or the wire: exactly one standard
// base64 encoding of 32 bytes, not all zero.
func ParsePublic(s string) (wgtypes.Key, error) {
	return parse([]byte(s))
}

func write(dir string) (wgtypes.Key, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return wgtypes.Key{}, fmt.Errorf("key directory: %w", err)
	}
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("generate key: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(dir, FileName), []byte(k.String()+"\n"), 0o600); err != nil {
		return wgtypes.Key{}, fmt.Errorf("store key: %w", err)
	}
	return k, nil
}

func loadPrivate(path string) (wgtypes.Key, error) {
	// Whoever can write the directory can swap the file for their own key.
	if di, err := os.Stat(filepath.Dir(path)); err == nil && di.Mode().Perm()&0o022 != 0 {
		return wgtypes.Key{}, fmt.Errorf("private key: directory %s: %w: mode %#o lets group or others replace the key", filepath.Dir(path), ErrInsecure, di.Mode().Perm())
	}
	fi, err := os.Lstat(path)
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("private key: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return wgtypes.Key{}, fmt.Errorf("private key %s: %w: not a regular file (%s)", path, ErrInsecure, fi.Mode().Type())
	}
	if err := checkFile(path, fi); err != nil {
		return wgtypes.Key{}, fmt.Errorf("private key: %w", err)
	}
	return readKey(path)
}

// checkFile refuses group/other access and a foreign owner: either lets another user learn
// or replace the key.
func checkFile(path string, fi fs.FileInfo) error {
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return fmt.Errorf("%s: %w: mode %#o allows group or other access (want 0600 or 0400)", path, ErrInsecure, perm)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("%s: %w: owned by uid %d, not %d", path, ErrInsecure, st.Uid, os.Geteuid())
	}
	return nil
}

func readKey(path string) (wgtypes.Key, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return wgtypes.Key{}, err
	}
	k, err := parse(bytes.TrimSuffix(b, []byte("\n")))
	if err != nil {
		// Never echo the content: it may be a key.
		return wgtypes.Key{}, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}

func parse(b []byte) (wgtypes.Key, error) {
	if len(b) != base64.StdEncoding.EncodedLen(wgtypes.KeyLen) {
		return wgtypes.Key{}, fmt.Errorf("bad key: %d characters, want %d (base64 of %d bytes)", len(b), base64.StdEncoding.EncodedLen(wgtypes.KeyLen), wgtypes.KeyLen)
	}
	// DecodedLen, not KeyLen: unpadded input decodes to one byte more.
	buf := make([]byte, base64.StdEncoding.DecodedLen(len(b)))
	n, err := base64.StdEncoding.Strict().Decode(buf, b)
	if err != nil || n != wgtypes.KeyLen {
		return wgtypes.Key{}, errors.New("bad key: not standard base64 of 32 bytes")
	}
	k := wgtypes.Key(buf[:wgtypes.KeyLen])
	if k == (wgtypes.Key{}) {
		return wgtypes.Key{}, errors.New("bad key: all zero")
	}
	return k, nil
}
