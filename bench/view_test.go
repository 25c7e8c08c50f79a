package bench

import (
	"bytes"
	"encoding/json"
	"fmt"
	"image"
	"image/png"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/comfyume/comfyume/comfytest"
)

// BenchmarkView measures downloading one captured output, a noisy
// 2048×2048 PNG of a few MB, over keep-alive HTTP/1.1 from:
//
//   - direct:      net/http's FileServer (no Caddy) over a copy of the file
//   - file_server: Caddy file_server over that copy
//   - comfyume:    comfyume's /view, from its disk blob store
//
// The comfyume copy is the real thing: a job ran on a fake GPU (home's
// input uploaded to the GPU, LoadImage → SaveImage there), the gateway
// captured the output, and /view checks that the job is the user's.
// conns=1 downloads one file at a time; parallel runs 4 downloads at once.
// cpu-ms/op is the CPU time of the whole process (client and servers)
// per download.
func BenchmarkView(b *testing.B) {
	home := comfytest.New(comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.New(comfytest.Options{Version: "2026", Name: "gpu"})
	for _, s := range []*comfytest.Server{home, gpu} {
		if err := s.Listen("127.0.0.1:0"); err != nil {
			b.Fatal(err)
		}
		defer s.Close()
	}
	dir := b.TempDir()
	ports := startCaddy(b, `{`+caddyGlobals+`
	comfyume {
		pool gpu {
			upstream `+gpu.URL()+` {
				max_jobs 1
			}
		}
		outputs disk {DATA}
	}
}

:{PORT:comfyume} {
	bind 127.0.0.1
	comfyume {
		home `+home.URL()+`
		run_on gpu
	}
	reverse_proxy `+strings.TrimPrefix(home.URL(), "http://")+`
}

:{PORT:files} {
	bind 127.0.0.1
	root * `+dir+`
	file_server
}
`)
	gw := fmt.Sprintf("http://127.0.0.1:%d", ports["comfyume"])

	// Run a job whose output is a large PNG, and find its captured copy.
	home.PutInput("", "bench-noise.png", noisyPNG(b, 2048, 2048))
	ref := runJob(b, gw, map[string]any{
		"1": map[string]any{"class_type": "LoadImage", "inputs": map[string]any{"image": "bench-noise.png"}},
		"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "bench"}},
	}, "2")
	q := url.Values{}
	for _, k := range []string{"filename", "subfolder", "type"} {
		q.Set(k, ref[k])
	}
	viewURL := gw + "/view?" + q.Encode()
	want, ok := gpu.OutputFile("output", "", ref["filename"])
	if !ok {
		b.Fatalf("gpu has no output %v", ref)
	}
	got := fetch(b, http.DefaultClient, viewURL)
	if !bytes.Equal(got, want) {
		b.Fatalf("/view served %d bytes, the GPU made %d", len(got), len(want))
	}
	if err := os.WriteFile(filepath.Join(dir, ref["filename"]), got, 0o644); err != nil {
		b.Fatal(err)
	}
	b.Logf("output %s: %d bytes", ref["filename"], len(got))

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	directSrv := &http.Server{Handler: http.FileServer(http.Dir(dir)), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = directSrv.Serve(ln) }()
	defer directSrv.Close()

	paths := []struct{ name, url string }{
		{"direct", "http://" + ln.Addr().String() + "/" + ref["filename"]},
		{"file_server", fmt.Sprintf("http://127.0.0.1:%d/%s", ports["files"], ref["filename"])},
		{"comfyume", viewURL},
	}
	for _, p := range paths {
		if got := fetch(b, http.DefaultClient, p.url); !bytes.Equal(got, want) {
			b.Fatalf("%s serves %d bytes, want %d", p.name, len(got), len(want))
		}
	}
	size := int64(len(want))
	for _, mode := range []string{"conns=1", "parallel"} {
		for _, p := range paths {
			b.Run(mode+"/path="+p.name, func(b *testing.B) {
				client := &http.Client{Transport: &http.Transport{
					MaxIdleConnsPerHost: 8,
					DisableCompression:  true,
				}}
				defer client.CloseIdleConnections()
				b.SetBytes(size)
				b.ReportAllocs()
				b.ResetTimer()
				cpu0 := cpuTime()
				defer func() {
					b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N)/1e6, "cpu-ms/op")
				}()
				if mode == "conns=1" {
					buf := make([]byte, 64<<10)
					for i := 0; i < b.N; i++ {
						download(b, client, p.url, size, buf)
					}
					return
				}
				b.SetParallelism(2) // 2×GOMAXPROCS goroutines
				b.RunParallel(func(pb *testing.PB) {
					buf := make([]byte, 64<<10)
					for pb.Next() {
						download(b, client, p.url, size, buf)
					}
				})
			})
		}
	}
}

func download(b *testing.B, client *http.Client, u string, size int64, buf []byte) {
	resp, err := client.Get(u)
	if err != nil {
		b.Error(err)
		return
	}
	n, err := io.CopyBuffer(io.Discard, resp.Body, buf)
	resp.Body.Close()
	if err != nil || n != size || resp.StatusCode != 200 {
		b.Errorf("GET %s: %d, %d bytes (%v)", u, resp.StatusCode, n, err)
	}
}

func fetch(tb testing.TB, client *http.Client, u string) []byte {
	tb.Helper()
	resp, err := client.Get(u)
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 {
		tb.Fatalf("GET %s: %d %v %s", u, resp.StatusCode, err, body[:min(len(body), 200)])
	}
	return body
}

// noisyPNG is a gradient with per-pixel noise: it compresses about as
// badly as a generated picture does.
func noisyPNG(tb testing.TB, w, h int) []byte {
	tb.Helper()
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	r := rand.New(rand.NewPCG(1, 2))
	for y := 0; y < h; y++ {
		for x := 0; x < w; x++ {
			i := img.PixOffset(x, y)
			n := r.Uint32()
			img.Pix[i+0] = uint8(x*255/w) ^ uint8(n&0x0f)
			img.Pix[i+1] = uint8(y*255/h) ^ uint8(n>>8&0x0f)
			img.Pix[i+2] = uint8((x+y)*127/w) ^ uint8(n>>16&0x0f)
			img.Pix[i+3] = 255
		}
	}
	var buf bytes.Buffer
	if err := (&png.Encoder{CompressionLevel: png.BestSpeed}).Encode(&buf, img); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

// runJob queues a prompt on the gateway, waits for it in /api/history and
// returns the first image ref of node.
func runJob(tb testing.TB, gw string, prompt map[string]any, node string) map[string]string {
	tb.Helper()
	body, _ := json.Marshal(map[string]any{"prompt": prompt, "client_id": "bench"})
	resp, err := http.Post(gw+"/api/prompt", "application/json", bytes.NewReader(body))
	if err != nil {
		tb.Fatal(err)
	}
	rb, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var a struct {
		PromptID string `json:"prompt_id"`
	}
	if resp.StatusCode != 200 || json.Unmarshal(rb, &a) != nil || a.PromptID == "" {
		tb.Fatalf("POST /api/prompt: %d %s", resp.StatusCode, rb)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		var hist map[string]struct {
			Outputs map[string]struct {
				Images []map[string]string `json:"images"`
			} `json:"outputs"`
			Status struct {
				StatusStr string `json:"status_str"`
				Completed bool   `json:"completed"`
			} `json:"status"`
		}
		resp, err := http.Get(gw + "/api/history/" + a.PromptID)
		if err != nil {
			tb.Fatal(err)
		}
		hb, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == 200 && json.Unmarshal(hb, &hist) == nil {
			if h, ok := hist[a.PromptID]; ok && h.Status.Completed {
				if imgs := h.Outputs[node].Images; len(imgs) > 0 {
					return imgs[0]
				}
				tb.Fatalf("job %s finished without output of node %s: %s", a.PromptID, node, hb)
			} else if ok && h.Status.StatusStr == "error" {
				tb.Fatalf("job %s failed: %s", a.PromptID, hb)
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	tb.Fatalf("job %s did not finish", a.PromptID)
	return nil
}
