package comfytest

import (
	"encoding/json"
	"fmt"
	"strings"
)

// UIWorkflow is a UI-format graph (nodes with positions, sizes, slots,
// widget values; links) of at least size bytes of JSON, built like what
// the frontend saves for a large graph (and sends in a POST /prompt's
// extra_data.extra_pnginfo.workflow), for benchmarks.
func UIWorkflow(size int) json.RawMessage {
	types := []struct{ class, in, out, widget string }{
		{"CLIPTextEncode", "clip", "CONDITIONING", "masterpiece, best quality, highly detailed photograph of a lighthouse on a cliff at dusk, volumetric light, 35mm, f/1.8, film grain"},
		{"KSampler", "model", "LATENT", "euler_ancestral"},
		{"LoraLoader", "model", "MODEL", "detail-tweaker-xl.safetensors"},
		{"VAEDecode", "samples", "IMAGE", ""},
		{"ImageScaleBy", "image", "IMAGE", "lanczos"},
	}
	var nodes, links []any
	n := 0
	for i := 1; n < size; i++ {
		t := types[i%len(types)]
		node := map[string]any{
			"id":    i,
			"type":  t.class,
			"pos":   []any{float64(i%40)*421.5 + 0.25, float64(i/40)*263.75 + 0.5},
			"size":  []any{400, 220},
			"flags": map[string]any{},
			"order": i - 1,
			"mode":  0,
			"inputs": []any{map[string]any{
				"name": t.in, "type": strings.ToUpper(t.in), "link": i,
			}},
			"outputs": []any{map[string]any{
				"name": t.out, "type": t.out, "links": []any{i + 1}, "slot_index": 0,
			}},
			"properties":     map[string]any{"Node name for S&R": t.class, "cnr_id": "comfy-core", "ver": "0.3.44"},
			"widgets_values": []any{fmt.Sprintf("%s (%d)", t.widget, i), 1000000 + i*7919, "randomize", 20, 7.5},
		}
		link := []any{i, i, 0, i + 1, 0, t.out}
		nodes = append(nodes, node)
		links = append(links, link)
		nb, _ := json.Marshal(node)
		lb, _ := json.Marshal(link)
		n += len(nb) + len(lb) + 2
	}
	wf, err := json.Marshal(map[string]any{
		"id":           "6f1c1b57-3a55-4d57-9a4e-0b8f1d3e2a11",
		"revision":     0,
		"last_node_id": len(nodes),
		"last_link_id": len(links),
		"nodes":        nodes,
		"links":        links,
		"groups":       []any{},
		"config":       map[string]any{},
		"extra":        map[string]any{"ds": map[string]any{"scale": 0.62, "offset": []any{118.4, -36.2}}, "frontendVersion": "1.23.4"},
		"version":      0.4,
	})
	if err != nil {
		panic(err)
	}
	return wf
}
