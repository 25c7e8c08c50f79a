package bench

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// BenchmarkWSRelay measures ComfyUI progress events flowing from a home
// ComfyUI to a browser over three paths:
//
//   - direct:        browser → home
//   - reverse_proxy: browser → Caddy reverse_proxy → home
//   - comfyume:      browser → Caddy comfyume (owns /ws, relays home's
//     stream over its own upstream socket) → home
//
// blast/sockets=S: home writes b.N frames as fast as it can, spread over S
// browser sockets; reports msgs/s and the one-way latency of each frame
// (which, at saturation, is mostly time spent queued in socket buffers).
//
// paced/sockets=S/rate=R: home sends R frames/s in total, evenly over S
// sockets, each on its own schedule; reports the one-way latency under a
// steady load well below saturation.
//
// lockstep: home sends one frame, the browser receives it, repeat; reports
// the one-way latency of an unloaded path.
//
// cpu-ns/op is the CPU time of the whole process (home, browser and Caddy
// all live in it) per frame; the difference to direct is the proxy's cost.
func BenchmarkWSRelay(b *testing.B) {
	home, err := startFakeHome()
	if err != nil {
		b.Fatal(err)
	}
	defer home.Close()
	ports := startCaddy(b, `{`+caddyGlobals+`
	comfyume {
		outputs disk {DATA}
	}
}

:{PORT:proxy} {
	bind 127.0.0.1
	reverse_proxy `+home.Addr()+`
}

:{PORT:comfyume} {
	bind 127.0.0.1
	comfyume {
		home `+home.URL()+`
	}
	reverse_proxy `+home.Addr()+`
}
`)
	paths := []struct{ name, url string }{
		{"direct", "ws://" + home.Addr() + "/ws"},
		{"reverse_proxy", fmt.Sprintf("ws://127.0.0.1:%d/ws", ports["proxy"])},
		{"comfyume", fmt.Sprintf("ws://127.0.0.1:%d/ws", ports["comfyume"])},
	}
	for _, sockets := range []int{1, 16} {
		for _, p := range paths {
			b.Run(fmt.Sprintf("blast/sockets=%d/path=%s", sockets, p.name), func(b *testing.B) {
				benchBlast(b, home, p.url, sockets)
			})
		}
	}
	for _, p := range paths {
		b.Run(fmt.Sprintf("paced/sockets=%d/rate=%d/path=%s", pacedSockets, pacedRate, p.name), func(b *testing.B) {
			benchPaced(b, home, p.url, pacedSockets, pacedRate)
		})
	}
	for _, p := range paths {
		b.Run("lockstep/path="+p.name, func(b *testing.B) { benchLockstep(b, home, p.url) })
	}
}

// The paced case: 16 browsers each getting 250 frames/s, far below what
// any path can carry, so latency is the path's, not a queue's.
const (
	pacedSockets = 16
	pacedRate    = 4000 // frames/s over all sockets
)

// pair is one browser socket and the socket home holds for it.
type pair struct {
	browser *browserConn
	home    *homeConn
}

type browserConn struct {
	c   *websocket.Conn
	buf []byte
}

var sidSeq atomic.Int64

// openPairs opens n browser sockets to url and waits until home holds
// the matching socket (for comfyume, its upstream socket for that sid).
func openPairs(b *testing.B, home *fakeHome, url string, n int) []pair {
	b.Helper()
	out := make([]pair, 0, n)
	for i := 0; i < n; i++ {
		sid := fmt.Sprintf("bench%d", sidSeq.Add(1))
		c, _, err := websocket.DefaultDialer.Dial(url+"?clientId="+sid, http.Header{})
		if err != nil {
			b.Fatalf("dial %s: %v", url, err)
		}
		br := &browserConn{c: c, buf: make([]byte, 0, 4096)}
		// The first frame is a status (home's, or the gateway's own).
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		first, err := br.read()
		if err != nil || !isStatus(first) {
			b.Fatalf("first frame from %s: %q (%v)", url, first, err)
		}
		hc, err := home.waitConn(sid, 10*time.Second)
		if err != nil {
			b.Fatal(err)
		}
		out = append(out, pair{browser: br, home: hc})
	}
	b.Cleanup(func() {
		for _, p := range out {
			p.browser.c.Close()
		}
	})
	return out
}

func isStatus(m []byte) bool {
	return bytes.HasPrefix(m, []byte(`{"type":"status",`)) || bytes.HasPrefix(m, []byte(`{"type": "status",`))
}

// read returns the next message; the slice is reused by the next read.
func (br *browserConn) read() ([]byte, error) {
	_, r, err := br.c.NextReader()
	if err != nil {
		return nil, err
	}
	buf := br.buf[:0]
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			br.buf = buf
			return buf, nil
		}
		if err != nil {
			return nil, err
		}
	}
}

// recvProgress reads until n progress frames arrived (skipping status
// frames) and appends their one-way latencies (ns) to lat.
func (br *browserConn) recvProgress(n int, lat []int64) ([]int64, error) {
	_ = br.c.SetReadDeadline(time.Now().Add(60 * time.Second))
	for got := 0; got < n; {
		m, err := br.read()
		if err != nil {
			return lat, err
		}
		ts, ok := progressStamp(m)
		if !ok {
			continue
		}
		lat = append(lat, time.Now().UnixNano()-ts)
		got++
	}
	return lat, nil
}

func benchBlast(b *testing.B, home *fakeHome, url string, sockets int) {
	pairs := openPairs(b, home, url, sockets)
	counts := make([]int, sockets)
	lats := make([][]int64, sockets)
	for i := range counts {
		counts[i] = b.N / sockets
		if i < b.N%sockets {
			counts[i]++
		}
		lats[i] = make([]int64, 0, counts[i])
	}
	var (
		wg       sync.WaitGroup
		firstErr atomic.Value
	)
	fail := func(err error) { firstErr.CompareAndSwap(nil, err) }
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime()
	start := time.Now()
	for i, p := range pairs {
		n := counts[i]
		wg.Add(2)
		go func() {
			defer wg.Done()
			for v := 0; v < n; v++ {
				if err := p.home.sendProgress(v%20+1, 20); err != nil {
					fail(err)
					return
				}
			}
		}()
		go func() {
			defer wg.Done()
			var err error
			if lats[i], err = p.browser.recvProgress(n, lats[i]); err != nil {
				fail(err)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	cpu := cpuTime() - cpu0
	b.StopTimer()
	if err, _ := firstErr.Load().(error); err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "msgs/s")
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N), "cpu-ns/op")
	reportLatency(b, slices.Concat(lats...))
}

func benchPaced(b *testing.B, home *fakeHome, url string, sockets, rate int) {
	pairs := openPairs(b, home, url, sockets)
	counts := make([]int, sockets)
	lats := make([][]int64, sockets)
	for i := range counts {
		counts[i] = b.N / sockets
		if i < b.N%sockets {
			counts[i]++
		}
		lats[i] = make([]int64, 0, counts[i])
	}
	interval := time.Duration(int64(time.Second) * int64(sockets) / int64(rate))
	var (
		wg       sync.WaitGroup
		firstErr atomic.Value
	)
	fail := func(err error) { firstErr.CompareAndSwap(nil, err) }
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime()
	start := time.Now()
	for i, p := range pairs {
		n := counts[i]
		// Spread the sockets' schedules over one interval.
		first := start.Add(interval * time.Duration(i) / time.Duration(sockets))
		wg.Add(2)
		go func() {
			defer wg.Done()
			for v := 0; v < n; v++ {
				time.Sleep(time.Until(first.Add(interval * time.Duration(v))))
				if err := p.home.sendProgress(v%20+1, 20); err != nil {
					fail(err)
					return
				}
			}
		}()
		go func() {
			defer wg.Done()
			var err error
			if lats[i], err = p.browser.recvProgress(n, lats[i]); err != nil {
				fail(err)
			}
		}()
	}
	wg.Wait()
	cpu := cpuTime() - cpu0
	b.StopTimer()
	if err, _ := firstErr.Load().(error); err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N), "cpu-ns/op")
	reportLatency(b, slices.Concat(lats...))
}

func benchLockstep(b *testing.B, home *fakeHome, url string) {
	p := openPairs(b, home, url, 1)[0]
	lat := make([]int64, 0, b.N)
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime()
	for i := 0; i < b.N; i++ {
		if err := p.home.sendProgress(i%20+1, 20); err != nil {
			b.Fatal(err)
		}
		var err error
		if lat, err = p.browser.recvProgress(1, lat); err != nil {
			b.Fatal(err)
		}
	}
	cpu := cpuTime() - cpu0
	b.StopTimer()
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N), "cpu-ns/op")
	reportLatency(b, lat)
}

func reportLatency(b *testing.B, lat []int64) {
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	q := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))]) / 1e3 }
	var sum float64
	for _, v := range lat {
		sum += float64(v)
	}
	b.ReportMetric(sum/float64(len(lat))/1e3, "mean-µs")
	b.ReportMetric(q(0.50), "p50-µs")
	b.ReportMetric(q(0.99), "p99-µs")
	b.ReportMetric(q(0.999), "p99.9-µs")
}
