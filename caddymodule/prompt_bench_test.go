package caddymodule_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/comfyume/comfyume/comfytest"
)

// BenchmarkPromptPost1MiB posts what the ComfyUI frontend posts for a large
// graph — a small API prompt plus about 1 MiB of UI workflow in
// extra_data.extra_pnginfo.workflow — through Caddy with the comfyume
// handler (store memory, a pool on a fake GPU), in this process, so that
// `go test -cpuprofile` shows where the gateway's CPU goes. Each POST is
// timed alone; the job it makes is waited for untimed.
func BenchmarkPromptPost1MiB(b *testing.B) {
	home := comfytest.Start(b, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(b, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: time.Millisecond})
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "max_jobs 1", "max_jobs 0", 1)
	g := startCaddy(b, cf)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
	defer client.CloseIdleConnections()
	c := g.dialLoadClient(b, "alice", "bench-tab")
	body := bigPromptBody("bench-tab", 1<<20)
	post := func() string {
		req, _ := http.NewRequest("POST", g.Base+"/api/prompt", bytes.NewReader(body))
		req.Header.Set("X-User", "alice")
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		var a promptAnswer
		err = json.NewDecoder(resp.Body).Decode(&a)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 {
			b.Fatalf("POST: %d %v", resp.StatusCode, err)
		}
		return a.PromptID
	}
	for i := 0; i < 2; i++ { // warm up
		if err := c.waitEnd(post(), time.Minute); err != nil {
			b.Fatal(err)
		}
	}
	b.SetBytes(int64(len(body)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		id := post()
		b.StopTimer()
		if err := c.waitEnd(id, time.Minute); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}

// bigPromptBody is a POST /api/prompt body with a UI workflow of about
// size bytes in extra_data.extra_pnginfo.workflow.
func bigPromptBody(clientID string, size int) []byte {
	var nodes []any
	n := 0
	for i := 1; n < size; i++ {
		node := map[string]any{
			"id": i, "type": "KSampler", "pos": []any{float64(i%40)*421.5 + 0.25, float64(i/40) * 263.75},
			"size": []any{400, 220}, "flags": map[string]any{}, "order": i - 1, "mode": 0,
			"inputs":         []any{map[string]any{"name": "model", "type": "MODEL", "link": i}},
			"outputs":        []any{map[string]any{"name": "LATENT", "type": "LATENT", "links": []any{i + 1}, "slot_index": 0}},
			"properties":     map[string]any{"Node name for S&R": "KSampler", "cnr_id": "comfy-core", "ver": "0.3.44"},
			"widgets_values": []any{fmt.Sprintf("masterpiece, lighthouse on a cliff at dusk (%d)", i), 1000000 + i*7919, "randomize", 20, 7.5},
		}
		nb, _ := json.Marshal(node)
		n += len(nb) + 1
		nodes = append(nodes, node)
	}
	body, err := json.Marshal(map[string]any{
		"client_id": clientID,
		"prompt":    samplerWorkflow("bench", 2),
		"extra_data": map[string]any{"extra_pnginfo": map[string]any{"workflow": map[string]any{
			"id": "6f1c1b57-3a55-4d57-9a4e-0b8f1d3e2a11", "nodes": nodes, "links": []any{}, "version": 0.4,
		}}},
	})
	if err != nil {
		panic(err)
	}
	return body
}
