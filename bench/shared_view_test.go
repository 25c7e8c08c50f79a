package bench

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/comfyume/comfyume/comfytest"
)

// BenchmarkViewS3 measures downloading one captured output, the same
// noisy 2048×2048 PNG as BenchmarkView, kept in S3 (`outputs s3`, with
// `store valkey`), over keep-alive HTTP/1.1:
//
//   - s3-presigned:      GET of a presigned URL of the object with net/http,
//     straight from the S3 server (no Caddy)
//   - s3-minio:          minio-go GetObject of the object (no Caddy)
//   - comfyume-proxy:    comfyume's /view with `serve proxy`: ownership check
//     (job record in Valkey), then the object streamed from S3 through Caddy
//   - comfyume-redirect: /view with `serve redirect`: the 302 to a presigned
//     URL, then that GET (the client follows it)
//
// The S3 server is versitygw on the same machine (scripts/services/s3.sh),
// so these are loopback numbers: what comfyume adds on top of the S3
// server, not what a real bucket delivers. conns=1 downloads one file at
// a time; parallel runs 4 at once. cpu-ms/op is this process's CPU time
// (client and Caddy; the S3 server and Valkey are other processes) per
// download.
func BenchmarkViewS3(b *testing.B) {
	env := needShared(b)
	home := comfytest.New(comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.New(comfytest.Options{Version: "2026", Name: "gpu"})
	for _, s := range []*comfytest.Server{home, gpu} {
		if err := s.Listen("127.0.0.1:0"); err != nil {
			b.Fatal(err)
		}
		defer s.Close()
	}
	prefix := env.newPrefix(b)
	caddyfile := func(serve string) string {
		return `{` + sharedGlobals + `
	comfyume {
		pool gpu {
			upstream ` + gpu.URL() + ` {
				max_jobs 1
			}
		}
		` + env.storeValkey(prefix) + `
		` + env.outputsS3(prefix, serve) + `
	}
}

:{PORT:comfyume} {
	bind 127.0.0.1
	comfyume {
		home ` + home.URL() + `
		run_on gpu
	}
	reverse_proxy ` + strings.TrimPrefix(home.URL(), "http://") + `
}
`
	}
	// One config at a time runs in this process; /view of either finds
	// the job in Valkey and the file in S3.
	serving := ""
	gw := ""
	use := func(serve string) string {
		if serving != serve {
			gw = fmt.Sprintf("http://127.0.0.1:%d", startCaddy(b, caddyfile(serve))["comfyume"])
			serving = serve
		}
		return gw
	}

	home.PutInput("", "bench-noise.png", noisyPNG(b, 2048, 2048))
	ref := runJob(b, use("proxy"), map[string]any{
		"1": map[string]any{"class_type": "LoadImage", "inputs": map[string]any{"image": "bench-noise.png"}},
		"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "bench"}},
	}, "2")
	q := url.Values{}
	for _, k := range []string{"filename", "subfolder", "type"} {
		q.Set(k, ref[k])
	}
	viewPath := "/view?" + q.Encode()
	want, ok := gpu.OutputFile("output", "", ref["filename"])
	if !ok {
		b.Fatalf("gpu has no output %v", ref)
	}
	if got := fetch(b, http.DefaultClient, use("proxy")+viewPath); !bytes.Equal(got, want) {
		b.Fatalf("/view served %d bytes, the GPU made %d", len(got), len(want))
	}

	// The object: the only one of that size under the prefix.
	s3c := env.s3Client(b)
	ctx := context.Background()
	object := ""
	deadline := time.Now().Add(30 * time.Second)
	for object == "" && time.Now().Before(deadline) {
		for o := range s3c.ListObjects(ctx, env.s3Bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
			if o.Err == nil && o.Size == int64(len(want)) {
				object = o.Key
			}
		}
		if object == "" {
			time.Sleep(100 * time.Millisecond) // still in the spool?
		}
	}
	if object == "" {
		b.Fatalf("no object of %d bytes under %s", len(want), prefix)
	}
	presigned, err := s3c.PresignedGetObject(ctx, env.s3Bucket, object, time.Hour, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Logf("output %s: %d bytes, object %s", ref["filename"], len(want), object)

	type path struct {
		name  string
		serve string // the comfyume config it needs ("" = none)
		get   func(b *testing.B, client *http.Client, buf []byte)
	}
	size := int64(len(want))
	httpGet := func(u func() string) func(*testing.B, *http.Client, []byte) {
		return func(b *testing.B, client *http.Client, buf []byte) { download(b, client, u(), size, buf) }
	}
	paths := []path{
		{"s3-presigned", "", httpGet(presigned.String)},
		{"s3-minio", "", func(b *testing.B, _ *http.Client, buf []byte) {
			o, err := s3c.GetObject(ctx, env.s3Bucket, object, minio.GetObjectOptions{})
			if err != nil {
				b.Error(err)
				return
			}
			n, err := io.CopyBuffer(io.Discard, o, buf)
			o.Close()
			if err != nil || n != size {
				b.Errorf("GetObject: %d bytes (%v)", n, err)
			}
		}},
		{"comfyume-proxy", "proxy", httpGet(func() string { return gw + viewPath })},
		{"comfyume-redirect", "redirect", httpGet(func() string { return gw + viewPath })},
	}
	for _, p := range paths {
		if p.serve != "" {
			use(p.serve)
		}
		p.get(b, http.DefaultClient, make([]byte, 64<<10))
	}
	// serving is "redirect" now: check that /view does redirect.
	noFollow := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := noFollow.Get(gw + viewPath)
	if err != nil {
		b.Fatal(err)
	}
	resp.Body.Close()
	if loc := resp.Header.Get("Location"); resp.StatusCode != http.StatusFound || !strings.Contains(loc, "X-Amz-Signature") {
		b.Fatalf("serve redirect: /view answered %d %q", resp.StatusCode, loc)
	}
	// Grouped by the config they need: one config runs at a time, and
	// loading one logs a line to stderr, which must not land inside a
	// benchmark's result line.
	for _, serve := range []string{"proxy", "redirect"} {
		use(serve)
		for _, mode := range []string{"conns=1", "parallel"} {
			for _, p := range paths {
				if p.serve != serve && (p.serve != "" || serve != "proxy") {
					continue
				}
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
							p.get(b, client, buf)
						}
						return
					}
					b.SetParallelism(2) // 2×GOMAXPROCS goroutines
					b.RunParallel(func(pb *testing.PB) {
						buf := make([]byte, 64<<10)
						for pb.Next() {
							p.get(b, client, buf)
						}
					})
				})
			}
		}
	}
}
