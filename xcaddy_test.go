package comfyume_test

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The plugin convention works: scripts/build.sh installs xcaddy at the
// version xcaddy.json pins (`go install …/xcaddy@<version>`) and runs
//
//	xcaddy build <caddy> --with github.com/comfyume/comfyume=<this checkout>
//
// — the module root, nothing else of comfyume named — and the Caddy it
// builds lists comfyume's modules. Without modules.go's import of
// caddymodule the build succeeds but lists none of them.
//
// It compiles all of Caddy (about 5 minutes of CPU with a cold build
// cache, 40 s warm), so it runs under CI=true or COMFYUME_TEST_XCADDY=1.
func TestXcaddyBuild(t *testing.T) {
	if os.Getenv("CI") != "true" && os.Getenv("COMFYUME_TEST_XCADDY") == "" {
		t.Skip("builds Caddy with xcaddy (minutes); runs under CI=true or COMFYUME_TEST_XCADDY=1")
	}
	var pins struct {
		Caddy  string `json:"caddy"`
		Xcaddy string `json:"xcaddy"`
	}
	b, err := os.ReadFile("xcaddy.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &pins); err != nil {
		t.Fatal(err)
	}
	root, err := filepath.Abs(".")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if d, ok := t.Deadline(); ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, d.Add(-30*time.Second))
		defer cancel()
	}
	bin := filepath.Join(t.TempDir(), "comfyume-caddy")
	cmd := exec.CommandContext(ctx, "bash", "scripts/build.sh", bin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("scripts/build.sh: %v\n%s", err, out)
	}
	want := "xcaddy build " + pins.Caddy + " --with github.com/comfyume/comfyume=" + root + " --output"
	if !strings.Contains(string(out), "build.sh: go install github.com/caddyserver/xcaddy/cmd/xcaddy@"+pins.Xcaddy+"\n") ||
		!strings.Contains(string(out), "build.sh: "+want) {
		t.Errorf("build.sh did not run `go install …xcaddy@%s` and `%s`:\n%s", pins.Xcaddy, want, out)
	}
	list, err := exec.CommandContext(ctx, bin, "list-modules").CombinedOutput()
	if err != nil {
		t.Fatalf("list-modules: %v\n%s", err, list)
	}
	have := map[string]bool{}
	for _, l := range strings.Split(string(list), "\n") {
		have[strings.TrimSpace(l)] = true
	}
	for _, id := range []string{"comfyume", "admin.api.comfyume", "http.handlers.comfyume", "http.handlers.comfyume_worker"} {
		if !have[id] {
			t.Errorf("the xcaddy-built Caddy lacks module %s", id)
		}
	}
	if t.Failed() {
		t.Logf("list-modules:\n%s", list)
	}
	ver, _ := exec.CommandContext(ctx, bin, "version").CombinedOutput()
	if !strings.HasPrefix(strings.TrimSpace(string(ver)), pins.Caddy) {
		t.Errorf("built Caddy is %q, xcaddy.json pins %s", ver, pins.Caddy)
	}
}
