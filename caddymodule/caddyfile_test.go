package caddymodule_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// Configuration mistakes are refused with a message that names them.
func TestCaddyfileMistakesAreNamed(t *testing.T) {
	for _, c := range []struct{ global, site, want string }{
		{"pool gpu {\n upstream http://x {\n lost_timeout soon\n }\n }", "", `lost_timeout: "soon" is not a duration`},
		{"pool gpu {\n max_queued -1\n upstream http://x\n }", "", `max_queued: "-1" is not a non-negative number`},
		{"pool gpu {\n upstream http://x {\n flavour vanilla\n }\n }", "", `unrecognized upstream subdirective "flavour"`},
		{"store valkey {\n lease_ttl 0s\n }", "", `lease_ttl: "0s" is not a duration`},
		{"colour blue", "", `unrecognized comfyume option "colour"`},
		{"history_limit none", "", `history_limit: "none" is not a positive number`},
		{"history_size lots", "", `history_size: "lots" is not a size`},
		{"max_event_size huge", "", `max_event_size: "huge" is not a size`},
		{"max_job_queue endless", "", `max_job_queue: "endless" is not a size`},
		{"", "shoe_size 42", `unrecognized comfyume subdirective "shoe_size"`},
		{"", "max_body_size lots", `max_body_size: "lots" is not a size`},
		{"pool gpu {\n quota 30m per week\n upstream http://x\n }", "", `quota: period "week": only "per day"`},
		{"pool gpu {\n quota 30m a day\n upstream http://x\n }", "", `quota: want "quota <duration> [per day]"`},
		{"pool gpu {\n quota lots\n upstream http://x\n }", "", `quota: "lots" is not a duration`},
		{"pool gpu {\n max_jobs_per_day 0\n upstream http://x\n }", "", `max_jobs_per_day: "0" is not a positive number`},
		{"metrics_per_user yes", "", `wrong argument count`},
	} {
		cf := "{\n\tadmin off\n\tcomfyume {\n" + c.global + "\n\t}\n}\n:0 {\n\tcomfyume {\n" + c.site + "\n\t}\n}\n"
		_, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cf), nil)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q / %q: %v, want %q", c.global, c.site, err, c.want)
		}
	}
}

// Every Caddyfile shipped in examples/ (and the embedded demo config)
// adapts: the documentation's configurations are real ones.
func TestShippedCaddyfilesAdapt(t *testing.T) {
	// Parse-time environment placeholders ({$VAR}) the examples use:
	// examples/workshop/worker.Caddyfile's, as Dockerfile.gpu sets it.
	t.Setenv("COMFYUI_COMMAND", "python3 /opt/ComfyUI/main.py --listen 127.0.0.1 --port 8188")
	files, _ := filepath.Glob("../examples/*/*Caddyfile*")
	files = append(files, "../Caddyfile")
	if len(files) < 5 {
		t.Fatalf("found only %v", files)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if _, warn, err := caddyconfig.GetAdapter("caddyfile").Adapt(b, map[string]any{"filename": f}); err != nil {
			t.Errorf("%s: %v", f, err)
		} else {
			for _, w := range warn {
				t.Logf("%s: %s", f, w.String())
			}
		}
	}
}
