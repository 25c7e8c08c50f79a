package caddymodule_test

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"
	"time"

	"github.com/comfyume/comfyume/comfytest"
)

// A GPU server that sends an oversized JSON event and an oversized preview
// in the middle of a job: both are skipped (the browser never gets them),
// and the job goes on to execution_success with its output served.
func TestOversizedUpstreamFramesAreSkipped(t *testing.T) {
	t.Setenv("COMFYUME_TEST_TOKEN", "s3cret")
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 50 * time.Millisecond})
	const maxBinary, maxText = 2 << 20, 512 << 10
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "outputs disk {DATA}",
		"outputs disk {DATA}\n\t\tmax_event_size 2MiB 512KiB", 1)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)

	a := g.queue("alice", b.SID, samplerWorkflow("big", 20))
	b.waitType("progress", 30*time.Second) // the sampler runs

	pad := strings.Repeat("x", maxText)
	gpu.SendRaw(false, []byte(`{"type":"progress","data":{"value":1,"max":20,"prompt_id":"`+a.PromptID+`","node":"2","pad":"`+pad+`"}}`))
	md := `{"node_id":"2","prompt_id":"` + a.PromptID + `","display_node_id":"2","parent_node_id":null,"real_node_id":"2","image_type":"image/jpeg"}`
	preview := binary.BigEndian.AppendUint32(nil, 4)
	preview = binary.BigEndian.AppendUint32(preview, uint32(len(md)))
	preview = append(append(preview, md...), bytes.Repeat([]byte{0xff}, maxBinary)...)
	gpu.SendRaw(true, preview)

	frames := b.untilJobEnd(a.PromptID, 60*time.Second)
	seq := types(frames)
	for _, f := range frames {
		if f.text && len(f.data) > maxText || !f.text && len(f.data) > maxBinary {
			t.Fatalf("the browser got a %d-byte frame over the limit (%q…)", len(f.data), f.data[:40])
		}
	}
	if indexOf(frames, "execution_success") < 0 {
		t.Fatalf("the job did not succeed: %v", seq)
	}
	ref := outputRef(t, frames, "3")
	st, body, _ := g.do("alice", "GET", "/api/view?"+viewQuery(ref), nil)
	if st != 200 || !bytes.HasPrefix(body, []byte("\x89PNG")) {
		t.Fatalf("GET /api/view of the output: %d, %d bytes", st, len(body))
	}
}
