package relay

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/comfyume/comfyume/dispatch"
)

// fuzzJobs is how many ended jobs the fuzzed user has.
const fuzzJobs = 7

var (
	fuzzOnce sync.Once
	fuzzGW   *Gateway
)

// fuzzGateway is a gateway (memory store, no home) whose user "alice" has
// fuzzJobs ended jobs, shared by every fuzz input.
func fuzzGateway(t testing.TB) *Gateway {
	fuzzOnce.Do(func() {
		blobs, err := NewDiskBlobs(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		store := dispatch.NewMemoryStore()
		for i := 0; i < fuzzJobs; i++ {
			j := &dispatch.Job{
				ID: fmt.Sprintf("job-%d", i), User: "alice", Pool: "gpu", Number: float64(i),
				Status: dispatch.StatusCompleted, CreateTime: int64(1000 + i), StartTime: int64(1000 + i), EndTime: int64(2000 + i),
				Prompt: json.RawMessage(`{"1":{"class_type":"X","inputs":{}}}`),
			}
			if err := store.Save(context.Background(), j); err != nil {
				t.Fatal(err)
			}
		}
		fuzzGW, err = New(Config{Store: store, Blobs: blobs})
		if err != nil {
			t.Fatal(err)
		}
	})
	return fuzzGW
}

// FuzzPageQueries runs the real /api/jobs and /history handlers with any
// query: they never panic, and answer 200 with at most the user's jobs, or
// (/api/jobs only) a 400 {"error"}.
func FuzzPageQueries(f *testing.F) {
	for _, s := range []string{
		"", "limit=2&offset=1", "max_items=3", "max_items=3&offset=2",
		"limit=9223372036854775807&offset=1", "max_items=9223372036854775807&offset=1",
		"limit=1&offset=9223372036854775807", "max_items=-9223372036854775808&offset=-1",
		"limit=99999999999999999999999&offset=99999999999999999999", "offset=-1", "limit=0",
		"max_items=abc&offset=%00", "limit=+3&offset=+0", "max_items=2147483647&offset=2147483647",
	} {
		f.Add(s)
	}
	g := fuzzGateway(f)
	f.Fuzz(func(t *testing.T, q string) {
		site := Site{User: "alice"}
		for _, path := range []string{"/api/jobs", "/history"} {
			r := httptest.NewRequest(http.MethodGet, "/", nil)
			r.URL.Path, r.URL.RawQuery = path, q
			w := httptest.NewRecorder()
			if !g.ServeHTTP(w, r, site) {
				t.Fatalf("%s?%s not handled", path, q)
			}
			body := w.Body.Bytes()
			switch {
			case path == "/api/jobs" && w.Code == 200:
				var page struct {
					Jobs       []map[string]any `json:"jobs"`
					Pagination struct {
						Total int `json:"total"`
					} `json:"pagination"`
				}
				if err := json.Unmarshal(body, &page); err != nil || len(page.Jobs) > fuzzJobs || page.Pagination.Total != fuzzJobs {
					t.Fatalf("%s?%s: %v %s", path, q, err, body)
				}
			case path == "/api/jobs" && w.Code == 400:
				var e struct{ Error string }
				if json.Unmarshal(body, &e) != nil || e.Error == "" {
					t.Fatalf("%s?%s: 400 %s", path, q, body)
				}
			case path == "/history" && w.Code == 200:
				var h map[string]json.RawMessage
				if err := json.Unmarshal(body, &h); err != nil || len(h) > fuzzJobs {
					t.Fatalf("%s?%s: %v %.200s", path, q, err, body)
				}
			default:
				t.Fatalf("%s?%s: %d %s", path, q, w.Code, body)
			}
		}
	})
}

// The overflowing queries of the issue answer 200 with clamped pages.
func TestHugePageQueriesAreClamped(t *testing.T) {
	for _, tc := range []struct {
		q        string
		from, to int // the page, as indexes into the user's 7 jobs by end time
	}{
		{"max_items=9223372036854775807&offset=1", 1, 7},
		{"max_items=2&offset=9223372036854775807", 7, 7},
		{"max_items=2", 5, 7},
		{"max_items=2&offset=-1", 5, 7},
		{"max_items=99999999999999999999999", 0, 7},
	} {
		start, end := historyPage(must(url.ParseQuery(tc.q)), fuzzJobs)
		if start != tc.from || end != tc.to {
			t.Errorf("/history?%s selects [%d, %d), want [%d, %d)", tc.q, start, end, tc.from, tc.to)
		}
	}
	for _, tc := range []struct {
		q            string
		limit, offst int
	}{
		{"limit=9223372036854775807&offset=1", maxQueryInt, 1},
		{"limit=99999999999999999999999&offset=99999999999999999999", maxQueryInt, maxQueryInt},
	} {
		jq, problem := parseJobsQuery(must(url.ParseQuery(tc.q)))
		if problem != "" || jq.limit != tc.limit || jq.offset != tc.offst {
			t.Errorf("/api/jobs?%s: %q limit %d offset %d", tc.q, problem, jq.limit, jq.offset)
		}
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// FuzzHomeHistory serves any bytes as a home server's /history (and its
// /queue, to an older home without the jobs API) and runs the real
// /history, /history/{id} and /api/jobs handlers on them: they never panic
// and always answer valid JSON.
func FuzzHomeHistory(f *testing.F) {
	f.Add([]byte(`{"a": {"prompt": [1, "a", {}, {"create_time": 5}, []], "outputs": {"9": {"images": [{"filename": "x.png", "subfolder": "", "type": "output"}]}}, "status": {"status_str": "success", "completed": true, "messages": [["execution_start", {"timestamp": 3}], ["execution_success", {"timestamp": 4}]]}}}`))
	f.Add([]byte(`{"b": {"prompt": null, "status": {"messages": [["execution_error", {"timestamp": "x"}], [1], "x"]}}, "b": 7}`))
	f.Add([]byte(`{"c": {"prompt": [1e999, 2, 3, [], 5], "outputs": {"n": {"images": "no"}}}}`))
	f.Add([]byte(`[1,2]`))
	f.Add([]byte(`{"d": {}`))
	f.Add([]byte(`{"queue_running": [[1, "r", {}, {}, []]], "queue_pending": [["x"]]}`))
	// Alice's on a shared home (her sid there), and bob's.
	f.Add([]byte(`{"queue_running": [[1, "r", {}, {"client_id": "` + SharedSID("alice", "t") + `"}, []]], "queue_pending": [[2, "p", {}, {"client_id": "` + SharedSID("bob", "t") + `"}, []]]}`))
	f.Add([]byte(`{"a": {"prompt": [1, "a", {}, {"client_id": "` + SharedSID("alice", "t") + `"}, []], "status": {"messages": []}}, "b": {"prompt": [1, "b", {}, {"client_id": "` + SharedSID("bob", "t") + `"}, []]}}`))
	// Home answers in process (no sockets): /api/jobs is missing (an
	// older home), everything else answers the fuzzed bytes.
	var body atomic.Value
	body.Store([]byte("{}"))
	home := roundTripper(func(r *http.Request) (*http.Response, error) {
		if r.URL.Path == "/api/jobs" {
			return &http.Response{StatusCode: 404, Body: io.NopCloser(strings.NewReader("404 page not found")), Header: http.Header{}, Request: r}, nil
		}
		b := body.Load().([]byte)
		return &http.Response{StatusCode: 200, Body: io.NopCloser(bytes.NewReader(b)), ContentLength: int64(len(b)),
			Header: http.Header{"Content-Type": {"application/json"}}, Request: r}, nil
	})
	blobs, err := NewDiskBlobs(f.TempDir())
	if err != nil {
		f.Fatal(err)
	}
	g, err := New(Config{Blobs: blobs, Transport: home})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(g.Close)
	up, err := g.Home("http://home.invalid")
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		body.Store(data)
		for _, site := range []Site{{User: "alice", Home: up}, {User: "alice", Home: up, SharedHome: true}} {
			for _, path := range []string{"/history", "/history?max_items=2", "/history/a", "/api/jobs", "/api/jobs/a", "/queue"} {
				r := httptest.NewRequest(http.MethodGet, path, nil)
				w := httptest.NewRecorder()
				if !g.ServeHTTP(w, r, site) {
					t.Fatalf("%s not handled", path)
				}
				if w.Code == 200 && !json.Valid(w.Body.Bytes()) {
					t.Fatalf("%s: invalid JSON %.300s", path, w.Body.Bytes())
				}
				if site.SharedHome && bytes.Contains(w.Body.Bytes(), []byte(SharedSID("bob", "t"))) {
					t.Fatalf("%s on a shared home shows alice bob's job: %.300s", path, w.Body.Bytes())
				}
			}
		}
	})
}

type roundTripper func(*http.Request) (*http.Response, error)

func (f roundTripper) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
