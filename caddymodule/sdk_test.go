package caddymodule_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/comfyume/comfyume/comfytest"
)

// sdkDir holds the third-party client test: e2e/sdk/run.mjs drives the
// gateway with @saintno/comfyui-sdk from npm (`npm ci --prefix e2e/sdk`,
// which scripts/test.sh runs).
var sdkDir = filepath.Join("..", "e2e", "sdk")

// needSDK returns the path of run.mjs, or skips the test when node or the
// installed SDK is missing. Under CI (env CI set) a missing SDK fails the
// test instead, so CI cannot silently skip it.
func needSDK(t *testing.T) string {
	t.Helper()
	missing := func(format string, args ...any) {
		t.Helper()
		if os.Getenv("CI") != "" {
			t.Fatalf(format+" (CI is set: run `npm ci --prefix e2e/sdk`, as scripts/test.sh does)", args...)
		}
		t.Skipf(format+" (run `npm ci --prefix e2e/sdk`)", args...)
	}
	if _, err := exec.LookPath("node"); err != nil {
		missing("node is not installed: %v", err)
	}
	if _, err := os.Stat(filepath.Join(sdkDir, "node_modules", "@saintno", "comfyui-sdk", "package.json")); err != nil {
		missing("@saintno/comfyui-sdk is not installed in %s: %v", sdkDir, err)
	}
	script, err := filepath.Abs(filepath.Join(sdkDir, "run.mjs"))
	if err != nil {
		t.Fatal(err)
	}
	return script
}

// anonymousCaddyfile is poolCaddyfile without the `user` line: everyone is
// the one anonymous user, as in the embedded default Caddyfile.
func anonymousCaddyfile(home, gpu string) string {
	return strings.Replace(poolCaddyfile(home, gpu, ""), "\t\tuser {http.request.header.X-User}\n", "", 1)
}

// sdkResult is the JSON line run.mjs prints.
type sdkResult struct {
	PromptID  string   `json:"prompt_id"`
	Filename  string   `json:"filename"`
	Subfolder string   `json:"subfolder"`
	Type      string   `json:"type"`
	Bytes     int      `json:"bytes"`
	SHA256    string   `json:"sha256"`
	URL       string   `json:"url"`
	Progress  int      `json:"progress"`
	Previews  int      `json:"previews"`
	Events    []string `json:"events"`
}

// runSDK runs run.mjs against base and decodes its result line.
func runSDK(t *testing.T, script, base string, args ...string) sdkResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", append([]string{script, base}, args...)...)
	cmd.Dir = filepath.Dir(script)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	t.Logf("node run.mjs took %v", time.Since(start).Round(time.Millisecond))
	if err != nil {
		t.Fatalf("node run.mjs %s: %v\nstdout:\n%s\nstderr:\n%s", base, err, stdout.String(), stderr.String())
	}
	if stderr.Len() > 0 {
		t.Logf("run.mjs stderr:\n%s", stderr.String())
	}
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	var res sdkResult
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &res); err != nil {
		t.Fatalf("run.mjs output is not one JSON line: %v\n%s", err, stdout.String())
	}
	t.Logf("run.mjs: %s", lines[len(lines)-1])
	return res
}

// A real ComfyUI API client from npm, unchanged, queues a workflow through
// the gateway, follows it over its own WebSocket to completion and fetches
// the output through /view: the job ran on the GPU pool and the bytes the
// client got are the GPU's output.
func TestThirdPartySDKClient(t *testing.T) {
	script := needSDK(t)
	for _, tc := range []struct {
		name      string
		caddyfile func(home, gpu string) string
		user      string // X-User the SDK sends, "" for none
	}{
		// Everyone is the anonymous user.
		{"anonymous", anonymousCaddyfile, ""},
		// The user comes from a header, which the SDK sends on every request
		// and on the WebSocket handshake as its "custom" credentials.
		{"x-user-header", func(home, gpu string) string { return poolCaddyfile(home, gpu, "") }, "sdk-alice"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("COMFYUME_TEST_TOKEN", "s3cret")
			home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
			// 50ms per step: the SDK's CallWrapper subscribes to `executed`
			// only after a /history round trip that follows the first
			// `executing` it sees, so a job that finishes within that round
			// trip would be missed by the client itself (with any server).
			gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 50 * time.Millisecond})
			g := startCaddy(t, tc.caddyfile(home.URL(), gpu.URL()))

			var args []string
			if tc.user != "" {
				args = []string{"--user", tc.user}
			}
			res := runSDK(t, script, g.Base, args...)

			// It ran on the GPU, under the prompt_id the client was given.
			prompts := gpu.Prompts()
			if len(prompts) != 1 {
				t.Fatalf("gpu got %d prompts, want 1", len(prompts))
			}
			if n := len(home.Prompts()); n != 0 {
				t.Fatalf("home got %d prompts, want 0", n)
			}
			if !uuidV4.MatchString(res.PromptID) {
				t.Fatalf("prompt_id %q is not a lowercase UUIDv4", res.PromptID)
			}
			if prompts[0].PromptID != res.PromptID {
				t.Fatalf("gpu ran prompt_id %q, client was given %q", prompts[0].PromptID, res.PromptID)
			}
			if got := prompts[0].Header.Get("Authorization"); got != "Bearer s3cret" {
				t.Fatalf("Authorization toward GPU = %q", got)
			}
			sampler, _ := prompts[0].Prompt["2"].(map[string]any)
			if sampler["class_type"] != "FakeSampler" {
				t.Fatalf("gpu ran %v", prompts[0].Prompt)
			}

			// The bytes the SDK fetched from the gateway's /view are the GPU's.
			if !strings.HasPrefix(res.Subfolder, "comfyume/") || res.Type != "output" {
				t.Fatalf("output ref not the gateway's copy: subfolder %q type %q", res.Subfolder, res.Type)
			}
			want, ok := gpu.OutputFile("output", "", res.Filename)
			if !ok {
				t.Fatalf("gpu has no output %q", res.Filename)
			}
			sum := sha256.Sum256(want)
			if res.SHA256 != hex.EncodeToString(sum[:]) || res.Bytes != len(want) {
				t.Fatalf("client got %d bytes sha256 %s, gpu output is %d bytes sha256 %x", res.Bytes, res.SHA256, len(want), sum)
			}

			// The SDK's own socket saw the job: progress, a preview it could
			// decode (it knows only type-1 previews), the output and success.
			for _, typ := range []string{"status", "execution_start", "executing", "progress", "executed", "execution_success", "b_preview"} {
				if !slices.Contains(res.Events, typ) {
					t.Fatalf("client saw no %s event: %v", typ, res.Events)
				}
			}
			if res.Progress == 0 || res.Previews == 0 {
				t.Fatalf("CallWrapper reported %d progress and %d preview callbacks", res.Progress, res.Previews)
			}
			if slices.Index(res.Events, "execution_start") > slices.Index(res.Events, "executed") ||
				slices.Index(res.Events, "executed") > slices.Index(res.Events, "execution_success") {
				t.Fatalf("events out of order: %v", res.Events)
			}

			// The job belongs to the user the SDK's requests carried.
			history := func(user string) map[string]any {
				var h map[string]any
				g.getJSON(user, "/api/history/"+res.PromptID, &h)
				return h
			}
			if h := history(tc.user); h[res.PromptID] == nil {
				t.Fatalf("owner %q does not see the job in /api/history: %v", tc.user, h)
			}
			if tc.user != "" {
				if h := history("mallory"); len(h) != 0 {
					t.Fatalf("another user sees %s's job: %v", tc.user, h)
				}
			}
		})
	}
}
