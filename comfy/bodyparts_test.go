package comfy

import (
	"bytes"
	"encoding/json"
	"runtime"
	"strings"
	"testing"
)

// bigBody is a POST /prompt body with about 1 MiB of UI workflow.
func bigBody() []byte {
	wf := `{"id":"wf","nodes":[` + strings.Repeat(`{"id":1,"type":"KSampler","widgets_values":["a lighthouse",7]},`, 16000) + `{"id":2}]}`
	return []byte(`{"prompt":{"1":{"class_type":"KSampler","inputs":{"seed":1}}},"client_id":"tab",` +
		`"extra_data":{"extra_pnginfo":{"workflow":` + wf + `},"auth_token_comfy_org":"secret","small":[1,2]},"front":false}`)
}

// The body sent on to the GPU server shares the workflow's bytes with the
// request instead of copying a megabytes body once more, and is byte for
// byte what Body writes.
func TestBodyPartsShareTheWorkflow(t *testing.T) {
	body := bigBody()
	pr, berr := ParsePromptRequest(body)
	if berr != nil {
		t.Fatal(berr)
	}
	parts, err := pr.BodyParts("pid", "gw", SensitiveExtraData...)
	if err != nil {
		t.Fatal(err)
	}
	whole, err := pr.Body("pid", "gw", SensitiveExtraData...)
	if err != nil {
		t.Fatal(err)
	}
	if joined := bytes.Join(parts, nil); !bytes.Equal(joined, whole) {
		t.Fatalf("parts joined differ from Body:\n%.300s\n%.300s", joined, whole)
	}
	var got struct {
		PromptID  string                     `json:"prompt_id"`
		ClientID  string                     `json:"client_id"`
		ExtraData map[string]json.RawMessage `json:"extra_data"`
		Front     *bool                      `json:"front"`
	}
	if err := json.Unmarshal(whole, &got); err != nil {
		t.Fatal(err)
	}
	if got.PromptID != "pid" || got.ClientID != "gw" || got.Front == nil || string(got.ExtraData["small"]) != "[1,2]" {
		t.Fatalf("body %+v", got)
	}
	if _, ok := got.ExtraData["auth_token_comfy_org"]; ok {
		t.Fatal("credentials sent on")
	}
	if !bytes.Equal(got.ExtraData["extra_pnginfo"], pr.ExtraData["extra_pnginfo"]) {
		t.Fatal("workflow changed")
	}

	// What BodyParts allocates, per call, is a few KiB, not the workflow.
	var before, after runtime.MemStats
	const runs = 10
	runtime.ReadMemStats(&before)
	for i := 0; i < runs; i++ {
		if _, err := pr.BodyParts("pid", "gw", SensitiveExtraData...); err != nil {
			t.Fatal(err)
		}
	}
	runtime.ReadMemStats(&after)
	if per := (after.TotalAlloc - before.TotalAlloc) / runs; per > 64<<10 {
		t.Fatalf("BodyParts allocated %d bytes per call for a %d-byte body", per, len(body))
	}
}
