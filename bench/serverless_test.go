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
// coldDeployment starts a one-replica deployment with the given cold start
// behind a non-sticky balancer (worker transport) and a gateway with a pool
// of it (max_jobs), and opens the anonymous user's socket.
func coldDeployment(b *testing.B, coldStart time.Duration, maxJobs int) (*comfytest.Balancer, string, *websocket.Conn) {
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
				max_jobs `+fmt.Sprint(maxJobs)+`
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
	b.Cleanup(func() { conn.Close() })
	return d, base, conn
}

// coldPrompt is a tiny prompt; n makes it differ from others (no cache).
func coldPrompt(base string, n int) error {
	prompt := map[string]any{
		"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 8, "height": 8, "batch_size": 1, "color": n}},
		"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "cold"}},
	}
	body, _ := json.Marshal(map[string]any{"prompt": prompt, "client_id": "bench"})
	resp, err := http.Post("http://"+base+"/api/prompt", "application/json", bytes.NewReader(body))
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		return fmt.Errorf("prompt: %s", resp.Status)
	}
	return nil
}

// BenchmarkColdStartHeldJobs: two prompts wait for the same cold start
// (2 s), the second queued 1.6 s after the first, so their retry backoffs
// are out of step. Reported: how long after the replica is ready each one
// starts. The first prompt's own next retry would come 1.75 s after ready;
// once any retry gets through, every held job is sent at once.
func BenchmarkColdStartHeldJobs(b *testing.B) {
	const coldStart = 2 * time.Second
	d, base, conn := coldDeployment(b, coldStart, 2)
	var first, last []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		d.ScaleToZero()
		scaled := time.Now()
		if err := coldPrompt(base, 2*i); err != nil {
			b.Fatal(err)
		}
		time.Sleep(coldStart * 8 / 10)
		if err := coldPrompt(base, 2*i+1); err != nil {
			b.Fatal(err)
		}
		var starts []time.Duration
		for ends := 0; ends < 2; {
			_ = conn.SetReadDeadline(time.Now().Add(60 * time.Second))
			typ, msg, err := conn.ReadMessage()
			if err != nil {
				b.Fatal(err)
			}
			if typ == websocket.TextMessage && bytes.Contains(msg, []byte(`"execution_start"`)) {
				starts = append(starts, time.Since(scaled)-coldStart)
			}
			if typ == websocket.TextMessage && bytes.Contains(msg, []byte(`"node":null`)) {
				ends++
			}
		}
		first, last = append(first, starts[0]), append(last, starts[len(starts)-1])
	}
	b.StopTimer()
	for _, l := range [][]time.Duration{first, last} {
		sort.Slice(l, func(a, c int) bool { return l[a] < l[c] })
	}
	b.ReportMetric(float64(first[len(first)/2].Milliseconds()), "first-p50-ms-after-ready")
	b.ReportMetric(float64(last[len(last)/2].Milliseconds()), "last-p50-ms-after-ready")
	b.ReportMetric(float64(last[len(last)-1].Milliseconds()), "last-max-ms-after-ready")
}

func BenchmarkColdStartToFirstJob(b *testing.B) {
	const coldStart = 500 * time.Millisecond
	d, base, conn := coldDeployment(b, coldStart, 1)
	var delays []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		d.ScaleToZero()
		scaled := time.Now()
		if err := coldPrompt(base, 1); err != nil {
			b.Fatal(err)
		}
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
