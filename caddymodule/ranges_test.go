package caddymodule_test

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/comfyume/comfyume/comfytest"
)

// A /view with thousands of byte ranges of one output is served whole:
// with S3 outputs each range was one request to the bucket (2000 ranges,
// 2000 GETs for one request of one user — a bucket everyone's outputs
// share, often rate-limited).
func TestManyRangesServeWholeOutput(t *testing.T) {
	_, s3 := sharedEnv(t)
	var gets atomic.Int64
	target, _ := url.Parse("http://" + s3[0])
	rp := httputil.NewSingleHostReverseProxy(target)
	counting := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			gets.Add(1)
		}
		rp.ServeHTTP(w, r)
	}))
	defer counting.Close()

	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	prefix := fmt.Sprintf("ranges-%d/", time.Now().UnixNano())
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "outputs disk {DATA}", s3Outputs(counting.URL, prefix, s3), 1)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)
	a := g.queue("alice", b.SID, samplerWorkflow("ranges", 2))
	frames := b.untilJobEnd(a.PromptID, 30*time.Second)
	ref := outputRef(t, frames, "3")
	st, whole, _ := g.do("alice", "GET", "/api/view?"+viewQuery(ref), nil)
	if st != 200 || len(whole) < 400 {
		t.Fatalf("the output: %d, %d bytes", st, len(whole))
	}
	n := min(len(whole)/2, 2000)
	var rs []string
	for i := 0; i < n; i++ {
		rs = append(rs, fmt.Sprintf("%d-%d", 2*i, 2*i))
	}
	before := gets.Load()
	st, body, _ := g.do("alice", "GET", "/api/view?"+viewQuery(ref), nil, "Range", "bytes="+strings.Join(rs, ","))
	if st/100 != 2 || len(body) == 0 {
		t.Fatalf("/view with %d ranges: %d", n, st)
	}
	if got := gets.Load() - before; got > 4 {
		t.Fatalf("/view with %d ranges made %d GETs to the bucket", n, got)
	}
}
