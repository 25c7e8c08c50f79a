package bench

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/comfyume/comfyume/comfytest"
	"github.com/comfyume/comfyume/dispatch"
	"github.com/comfyume/comfyume/worker"
)

// BenchmarkColdStartToFirstJob measures, for a serverless deployment scaled
// to zero (one replica that takes 500 ms to start, behind a non-sticky
// balancer, with the worker transport), how long after the replica is ready
// the held job starts (its execution_start reaches the browser). Each
// iteration scales the deployment to zero and queues one prompt.
func BenchmarkColdStartToFirstJob(b *testing.B) {
	const coldStart = 500 * time.Millisecond
	home := comfytest.Start(b, comfytest.Options{Version: "2026", Name: "home"})
	d := comfytest.StartBalancer(b, comfytest.BalancerOptions{
		Replicas: 1, Server: comfytest.Options{Version: "2026", StepDelay: time.Millisecond}, ColdStart: coldStart,
		ExtraHandler: func(_ int, comfy *comfytest.Server) http.Handler {
			mux := http.NewServeMux()
			mux.Handle(dispatch.WorkerPath, worker.NewServer(comfy.URL(), worker.Options{}))
			mux.Handle("/", comfy.Handler())
			return mux
		},
	})
	ports := startCaddy(b, `{
	admin off
	comfyume {
		pool gpu {
			upstream `+d.URL()+` {
				transport worker
				max_jobs 1
			}
		}
		outputs disk {DATA}
	}
}
:{PORT:gw} {
	bind 127.0.0.1
	comfyume {
		home `+home.URL()+`
		run_on gpu
	}
	reverse_proxy `+strings.TrimPrefix(home.URL(), "http://")+`
}`)
	base := fmt.Sprintf("127.0.0.1:%d", ports["gw"])
	conn, _, err := websocket.DefaultDialer.Dial("ws://"+base+"/ws?clientId=bench", nil)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	prompt := map[string]any{
		"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 8, "height": 8, "batch_size": 1, "color": 1}},
		"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "cold"}},
	}
	var delays []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		d.ScaleToZero()
		scaled := time.Now()
		body, _ := json.Marshal(map[string]any{"prompt": prompt, "client_id": "bench"})
		resp, err := http.Post("http://"+base+"/api/prompt", "application/json", bytes.NewReader(body))
		if err != nil || resp.StatusCode != 200 {
			b.Fatalf("prompt: %v %v", err, resp)
		}
		resp.Body.Close()
		for {
			_ = conn.SetReadDeadline(time.Now().Add(60 * time.Second))
			typ, msg, err := conn.ReadMessage()
			if err != nil {
				b.Fatal(err)
			}
			if typ == websocket.TextMessage && bytes.Contains(msg, []byte(`"execution_start"`)) {
				// The replica is ready coldStart after the first request
				// that reached the scaled-to-zero deployment (about now
				// minus the time since scaling, bounded below by it).
				delays = append(delays, time.Since(scaled)-coldStart)
			}
			if typ == websocket.TextMessage && bytes.Contains(msg, []byte(`"node":null`)) {
				break
			}
		}
	}
	b.StopTimer()
	sort.Slice(delays, func(a, c int) bool { return delays[a] < delays[c] })
	b.ReportMetric(float64(delays[len(delays)/2].Milliseconds()), "p50-ms-after-ready")
	b.ReportMetric(float64(delays[len(delays)-1].Milliseconds()), "max-ms-after-ready")
}
