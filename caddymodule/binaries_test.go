package caddymodule_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// goBinary is a command of this module that tests run as a process of its
// own (a second Caddy replica, the fake ComfyUI a supervised worker
// starts). It is built once per test binary and removed by TestMain.
type goBinary struct {
	pkg, name string

	once sync.Once
	path string
	err  error
}

var (
	replicaBin   = &goBinary{pkg: "github.com/comfyume/comfyume/cmd/comfyume", name: "comfyume"}
	fakeComfyBin = &goBinary{pkg: "github.com/comfyume/comfyume/comfytest/cmd/fakecomfy", name: "fakecomfy"}

	builtMu   sync.Mutex
	builtDirs []string
)

// build returns the binary's path, building it on first use.
func (b *goBinary) build(t *testing.T) string {
	t.Helper()
	b.once.Do(func() {
		dir, err := os.MkdirTemp("", "comfyume-test-"+b.name+"-")
		if err != nil {
			b.err = err
			return
		}
		builtMu.Lock()
		builtDirs = append(builtDirs, dir)
		builtMu.Unlock()
		b.path = filepath.Join(dir, b.name)
		if out, err := exec.Command("go", "build", "-o", b.path, b.pkg).CombinedOutput(); err != nil {
			b.err = fmt.Errorf("go build %s: %v\n%s", b.pkg, err, out)
		}
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.path
}

// replicaBinary is cmd/comfyume: Caddy with comfyume's modules.
func replicaBinary(t *testing.T) string { return replicaBin.build(t) }

// fakeComfyBinary is comfytest/cmd/fakecomfy, the fake ComfyUI as a command.
func fakeComfyBinary(t *testing.T) string { return fakeComfyBin.build(t) }

// TestMain removes the binaries the tests built.
func TestMain(m *testing.M) {
	code := m.Run()
	builtMu.Lock()
	for _, dir := range builtDirs {
		_ = os.RemoveAll(dir)
	}
	builtMu.Unlock()
	os.Exit(code)
}
