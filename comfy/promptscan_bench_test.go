package comfy

import (
	"encoding/json"
	"fmt"
	"testing"
)

// frontendBody is a POST /prompt body like the ComfyUI frontend's for a
// large graph: a small API prompt and a UI workflow of about size bytes
// (nodes with positions, links, widget values; the shape of
// bench.uiWorkflow) in extra_data.extra_pnginfo.workflow.
func frontendBody(size int) []byte {
	types := []struct{ class, in, out, widget string }{
		{"CLIPTextEncode", "clip", "CONDITIONING", "masterpiece, best quality, highly detailed photograph of a lighthouse on a cliff at dusk, volumetric light, 35mm, f/1.8, film grain"},
		{"KSampler", "model", "LATENT", "euler_ancestral"},
		{"LoraLoader", "model", "MODEL", "detail-tweaker-xl.safetensors"},
		{"VAEDecode", "samples", "IMAGE", ""},
		{"ImageScaleBy", "image", "IMAGE", "lanczos"},
	}
	var nodes, links []any
	for i, n := 1, 0; n < size; i++ {
		t := types[i%len(types)]
		node := map[string]any{
			"id": i, "type": t.class,
			"pos":   []any{float64(i%40)*421.5 + 0.25, float64(i/40)*263.75 + 0.5},
			"size":  []any{400, 220},
			"flags": map[string]any{}, "order": i - 1, "mode": 0,
			"inputs":         []any{map[string]any{"name": t.in, "type": t.in, "link": i}},
			"outputs":        []any{map[string]any{"name": t.out, "type": t.out, "links": []any{i + 1}, "slot_index": 0}},
			"properties":     map[string]any{"Node name for S&R": t.class, "cnr_id": "comfy-core", "ver": "0.3.44"},
			"widgets_values": []any{fmt.Sprintf("%s (%d)", t.widget, i), 1000000 + i*7919, "randomize", 20, 7.5},
		}
		link := []any{i, i, 0, i + 1, 0, t.out}
		nb, _ := json.Marshal(node)
		lb, _ := json.Marshal(link)
		n += len(nb) + len(lb) + 2
		nodes, links = append(nodes, node), append(links, link)
	}
	body, err := json.Marshal(map[string]any{
		"client_id": "c",
		"prompt": map[string]any{
			"3": map[string]any{"class_type": "KSampler", "inputs": map[string]any{"seed": 5, "steps": 20, "model": []any{"4", 0}}},
			"9": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"3", 0}, "filename_prefix": "ComfyUI"}},
		},
		"extra_data": map[string]any{"extra_pnginfo": map[string]any{"workflow": map[string]any{
			"id": "6f1c1b57-3a55-4d57-9a4e-0b8f1d3e2a11", "revision": 0, "last_node_id": len(nodes),
			"nodes": nodes, "links": links, "groups": []any{}, "config": map[string]any{}, "version": 0.4,
		}}},
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
		if _, berr := ParsePromptRequest(body); berr != nil {
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
