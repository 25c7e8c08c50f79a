package comfy_test

import (
	"encoding/json"
	"strconv"
	"testing"

	"github.com/comfyume/comfyume/comfy"
	"github.com/comfyume/comfyume/comfytest"
)

// frontendBody is a POST /prompt body like the ComfyUI frontend's for a
// large graph: a small API prompt and a UI workflow of about size bytes
// (comfytest.UIWorkflow) in extra_data.extra_pnginfo.workflow.
func frontendBody(size int) []byte {
	body, err := json.Marshal(map[string]any{
		"client_id": "c",
		"prompt": map[string]any{
			"3": map[string]any{"class_type": "KSampler", "inputs": map[string]any{"seed": 5, "steps": 20, "model": []any{"4", 0}}},
			"9": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"3", 0}, "filename_prefix": "ComfyUI"}},
		},
		"extra_data": map[string]any{"extra_pnginfo": map[string]any{"workflow": comfytest.UIWorkflow(size)}},
	})
	if err != nil {
		panic(err)
	}
	return body
}

// BenchmarkParsePromptRequestFrontend1MiB checks and splits the body the
// gateway gets for every POST /prompt of a large graph.
func BenchmarkParsePromptRequestFrontend1MiB(b *testing.B) {
	body := frontendBody(1 << 20)
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, berr := comfy.ParsePromptRequest(body); berr != nil {
			b.Fatal(berr)
		}
	}
}

// BenchmarkJSONValidFrontend1MiB is encoding/json's check of the same body,
// for scale.
func BenchmarkJSONValidFrontend1MiB(b *testing.B) {
	body := frontendBody(1 << 20)
	b.SetBytes(int64(len(body)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if !json.Valid(body) {
			b.Fatal("invalid")
		}
	}
}

// BenchmarkParsePromptRequest200Nodes parses the API prompt of a large
// graph (200 nodes of a few inputs each, links among them), without a UI
// workflow: the per-node part of every POST /prompt.
func BenchmarkParsePromptRequest200Nodes(b *testing.B) {
	prompt := map[string]any{}
	for i := 0; i < 200; i++ {
		prompt[strconv.Itoa(i+1)] = map[string]any{
			"class_type": "KSampler",
			"inputs": map[string]any{
				"seed": 156680208700286, "steps": 20, "cfg": 8, "sampler_name": "euler",
				"scheduler": "normal", "denoise": 1, "model": []any{strconv.Itoa(i), 0},
				"positive": []any{strconv.Itoa(i), 1}, "negative": []any{strconv.Itoa(i), 2},
			},
			"_meta": map[string]any{"title": "KSampler"},
		}
	}
	body, err := json.Marshal(map[string]any{"client_id": "c", "prompt": prompt})
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		if _, berr := comfy.ParsePromptRequest(body); berr != nil {
			b.Fatal(berr)
		}
	}
}
