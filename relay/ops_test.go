package relay

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/comfyume/comfyume/dispatch"
)

// sseReader reads one operator stream's events.
type sseReader struct {
	t      *testing.T
	resp   *http.Response
	events chan string // data of each event, or ":" for a comment
}

func openStream(t *testing.T, url string) *sseReader {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	s := &sseReader{t: t, resp: resp, events: make(chan string, 100)}
	if resp.StatusCode != 200 {
		return s
	}
	go func() {
		defer close(s.events)
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			line := sc.Text()
			switch {
			case strings.HasPrefix(line, "data: "):
				s.events <- strings.TrimPrefix(line, "data: ")
			case strings.HasPrefix(line, ":"):
				s.events <- ":"
			}
		}
	}()
	return s
}

// next returns the next state's "v" (skipping heartbeats).
func (s *sseReader) next() int64 {
	s.t.Helper()
	for {
		select {
		case d, ok := <-s.events:
			if !ok {
				s.t.Fatal("stream ended")
			}
			if d == ":" {
				continue
			}
			var st struct {
				Time int64 `json:"time"`
				V    int64 `json:"v"`
			}
			if err := json.Unmarshal([]byte(d), &st); err != nil || st.Time == 0 {
				s.t.Fatalf("bad state %q: %v", d, err)
			}
			return st.V
		case <-time.After(10 * time.Second):
			s.t.Fatal("no state within 10s")
		}
	}
}

// fakeGap replaces the feed's wait between two states: each wait is
// announced on asked, and ends when the test sends on release.
type fakeGap struct {
	asked   chan time.Duration
	release chan time.Time
}

// wait returns the next gap the feed asked to wait.
func (g *fakeGap) wait(t *testing.T) time.Duration {
	t.Helper()
	select {
	case d := <-g.asked:
		return d
	case <-time.After(10 * time.Second):
		t.Fatal("the feed did not wait between two states")
	}
	return 0
}

func newFakeGap() *fakeGap {
	return &fakeGap{asked: make(chan time.Duration, 16), release: make(chan time.Time)}
}

func (g *fakeGap) after(d time.Duration) <-chan time.Time {
	ch := make(chan time.Time, 1)
	g.asked <- d
	go func() { ch <- <-g.release }()
	return ch
}

// However many changes come while the feed waits out its gap, each page
// gets one state after it — the latest — not one per change: at most
// one state per gap (2 a second), whatever the job traffic.
func TestOpsFeedRateLimit(t *testing.T) {
	var v atomic.Int64
	var builds atomic.Int64
	f := newOpsFeed(func(context.Context) []byte {
		builds.Add(1)
		return []byte(fmt.Sprintf(`{"v":%d}`, v.Load()))
	}, 4)
	gap := newFakeGap()
	f.after = gap.after
	f.poll = time.Hour
	srv := httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(func() { srv.CloseClientConnections(); srv.Close() })

	s := openStream(t, srv.URL)
	if got := s.next(); got != 0 {
		t.Fatalf("first state v=%d, want 0", got)
	}
	if d := gap.wait(t); d != opsMinGap {
		t.Fatalf("gap %v, want %v", d, opsMinGap)
	}
	// 100 changes while the feed waits.
	for i := 1; i <= 100; i++ {
		v.Store(int64(i))
		f.changed()
	}
	gap.release <- time.Now()
	if got := s.next(); got != 100 {
		t.Fatalf("state after the gap v=%d, want the latest (100)", got)
	}
	gap.wait(t) // waiting again: nothing more was sent meanwhile
	select {
	case d := <-s.events:
		t.Fatalf("a second state within one gap: %q", d)
	default:
	}
	if n := builds.Load(); n != 2 {
		t.Fatalf("built the state %d times for 101 changes in two gaps, want 2", n)
	}
	// Nothing changed: a change signal builds, but sends nothing.
	f.changed()
	gap.release <- time.Now()
	gap.wait(t)
	select {
	case d := <-s.events:
		if d != ":" {
			t.Fatalf("an unchanged state was sent again: %q", d)
		}
	default:
	}
}

// Only so many pages stream at once: one more is answered 503 with
// Retry-After (the page tries again later), and gets in once one left.
// Heartbeats keep a quiet stream alive.
func TestOpsFeedBound(t *testing.T) {
	f := newOpsFeed(func(context.Context) []byte { return []byte(`{"v":1}`) }, 3)
	f.heartbeat = 20 * time.Millisecond
	srv := httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(func() { srv.CloseClientConnections(); srv.Close() })
	var open []*sseReader
	for i := 0; i < 3; i++ {
		s := openStream(t, srv.URL)
		if s.resp.StatusCode != 200 || s.resp.Header.Get("Content-Type") != "text/event-stream" {
			t.Fatalf("stream %d: %d %s", i, s.resp.StatusCode, s.resp.Header.Get("Content-Type"))
		}
		s.next()
		open = append(open, s)
	}
	extra := openStream(t, srv.URL)
	if extra.resp.StatusCode != http.StatusServiceUnavailable || extra.resp.Header.Get("Retry-After") == "" {
		t.Fatalf("a stream over the bound: %d (Retry-After %q), want 503", extra.resp.StatusCode, extra.resp.Header.Get("Retry-After"))
	}
	// A heartbeat on a quiet stream.
	select {
	case d := <-open[0].events:
		if d != ":" {
			t.Fatalf("quiet stream sent %q, want a heartbeat comment", d)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no heartbeat")
	}
	open[0].resp.Body.Close()
	deadline := time.Now().Add(10 * time.Second)
	for f.streams() >= 3 {
		if time.Now().After(deadline) {
			t.Fatal("a closed page still counts")
		}
		time.Sleep(10 * time.Millisecond)
	}
	again := openStream(t, srv.URL)
	if again.resp.StatusCode != 200 {
		t.Fatalf("a stream after one left: %d", again.resp.StatusCode)
	}
	again.next()
}

// stamp adds the server's time to a state without breaking its JSON.
func TestOpsStamp(t *testing.T) {
	for _, in := range []string{`{}`, `{"a":1}`, ``, `null`} {
		var v map[string]any
		if err := json.Unmarshal(stamp([]byte(in)), &v); err != nil || v["time"] == nil {
			t.Fatalf("stamp(%q) = %s: %v", in, stamp([]byte(in)), err)
		}
	}
}

// A page that stops reading (a laptop gone to sleep, a stuck proxy) is
// dropped once a write to it has waited writeTimeout, and gives its place
// back: stale pages cannot fill MaxOpsStreams and lock the operator out.
func TestOpsFeedDropsPageThatStoppedReading(t *testing.T) {
	var n atomic.Int64
	var small atomic.Bool
	big := strings.Repeat("x", 256<<10)
	f := newOpsFeed(func(context.Context) []byte {
		if small.Load() {
			return []byte(`{"v":1}`)
		}
		return []byte(fmt.Sprintf(`{"n":%d,"pad":%q}`, n.Add(1), big)) // changes every time
	}, 1)
	f.poll, f.minGap, f.heartbeat = 5*time.Millisecond, time.Millisecond, 20*time.Millisecond
	f.writeTimeout = 200 * time.Millisecond
	srv := httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(func() { srv.CloseClientConnections(); srv.Close() })
	c, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.(*net.TCPConn).SetReadBuffer(4096)
	if _, err := fmt.Fprintf(c, "GET /events HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	// The page is open, and reads nothing more.
	deadline := time.Now().Add(10 * time.Second)
	for f.streams() != 1 {
		if time.Now().After(deadline) {
			t.Fatal("the stream never opened")
		}
		time.Sleep(5 * time.Millisecond)
	}
	deadline = time.Now().Add(20 * time.Second)
	for f.streams() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("a page that reads nothing keeps its place")
		}
		time.Sleep(10 * time.Millisecond)
	}
	small.Store(true)
	again := openStream(t, srv.URL)
	if again.resp.StatusCode != 200 {
		t.Fatalf("the operator's page after the stale one was dropped: %d", again.resp.StatusCode)
	}
	again.next()
}

// BenchmarkOpsState builds the operator page's state of a busy workshop
// (memory store): 50 jobs running on 50 endpoints, 500 waiting from 100
// users, 100 failures kept. Reports the state's size.
func BenchmarkOpsState(b *testing.B) {
	blobs, err := NewDiskBlobs(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	store := dispatch.NewMemoryStore()
	g, err := New(Config{Blobs: blobs, Store: store})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(g.Close)
	p := &dispatch.Pool{Name: "gpu"}
	for i := 0; i < 50; i++ {
		u, err := dispatch.NewUpstream(fmt.Sprintf("http://10.0.0.%d:8188", i), dispatch.UpstreamOptions{MaxJobs: 1})
		if err != nil {
			b.Fatal(err)
		}
		p.Upstreams = append(p.Upstreams, u)
	}
	g.Manager().SetPool(p)
	ctx := context.Background()
	for i := 0; i < 550; i++ {
		j := &dispatch.Job{ID: fmt.Sprintf("job-%d", i), User: fmt.Sprintf("user-%d", i%100), Pool: "gpu",
			Status: dispatch.StatusPending, CreateTime: int64(i), Prompt: []byte(`{}`)}
		if i < 50 {
			j.Upstream, j.Status, j.StartTime = p.Upstreams[i].String(), dispatch.StatusInProgress, int64(i)
		}
		if err := store.Create(ctx, j); err != nil {
			b.Fatal(err)
		}
	}
	var size int
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		size = len(g.Ops().State(ctx))
	}
	b.ReportMetric(float64(size), "bytes/state")
}
