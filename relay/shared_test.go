package relay

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// A user's sids at a shared home are theirs alone: no other user and
// clientId (moving bytes between the two) makes the same sid, and only the
// user's own are recognised as theirs.
func TestSharedSIDsAreEachUsers(t *testing.T) {
	alice := SharedSID("alice", "bob")
	for _, other := range [][2]string{{"ali", "cebob"}, {"alicebob", ""}, {"", "alicebob"}, {"bob", "alice"}} {
		if s := SharedSID(other[0], other[1]); s == alice || ownsHomeSID("alice", s) {
			t.Errorf("user %q clientId %q: %s, alice's %s", other[0], other[1], s, alice)
		}
	}
	if len(alice) != 32 || !ownsHomeSID("alice", alice) || ownsHomeSID("bob", alice) || ownsHomeSID("alice", "bob") {
		t.Errorf("alice's sid %q not recognised as hers alone", alice)
	}
	if SharedSID("alice", "bob") != alice {
		t.Errorf("alice's sid is not stable")
	}
	if s := SharedSID("alice", "bob "); s == alice || !ownsHomeSID("alice", s) {
		t.Errorf("alice's other clientId: %s (hers for %q: %s)", s, "bob", alice)
	}
	if (Site{User: "alice"}).HomeSID("bob") != "bob" || (Site{User: "alice", SharedHome: true}).HomeSID("bob") != alice {
		t.Errorf("HomeSID: a home of the user's own takes the clientId as is, a shared one the user's sid")
	}
}

// A link to a shared home passes the frames home sends to every socket only
// while its own job runs: from its start, or from the executing home
// repeats to a socket that reconnects mid-job, to its end.
func TestSharedGate(t *testing.T) {
	progress := []byte(`{"type":"progress","data":{"value":1,"max":2,"prompt_id":"p","node":"2"}}`)
	display := []byte(`{"type":"display_component","data":{"node_id":"2"}}`)
	preview := []byte{0, 0, 0, 3, 0, 0, 0, 1, '2', 'x'}
	steps := []struct {
		frame  []byte
		binary bool
		want   bool
	}{
		{progress, false, false}, {display, false, false}, {preview, true, false},
		{[]byte(`{"type":"execution_interrupted","data":{"prompt_id":"q"}}`), false, false},
		{[]byte(`{"type":"status","data":{"status":{"exec_info":{"queue_remaining":1}}}}`), false, true},
		{[]byte(`{"type":"execution_start","data":{"prompt_id":"p"}}`), false, true},
		{progress, false, true}, {display, false, true}, {preview, true, true},
		{[]byte(`{"type":"execution_success","data":{"prompt_id":"p"}}`), false, true},
		{progress, false, false}, {preview, true, false},
		{[]byte(`{"type":"executing","data":{"node":null,"prompt_id":"p"}}`), false, true},
		{[]byte(`{"type":"executing","data":{"node":"2"}}`), false, true}, // a reconnect mid-job
		{progress, false, true},
		{[]byte(`{"type":"execution_interrupted","data":{"prompt_id":"p"}}`), false, true},
		{display, false, false}, {[]byte(`{"type":"crystools.monitor","data":{}}`), false, true},
	}
	var g sharedGate
	for i, s := range steps {
		if got := g.pass(s.binary, s.frame); got != s.want {
			t.Errorf("step %d %s: pass %v, want %v", i, s.frame, got, s.want)
		}
	}
}

// A prompt passed on to a shared home names the user's own sid there as
// its client_id, whichever client_id (or extra_data's, or none) it came
// with, and only that one.
func TestOwnHomePrompt(t *testing.T) {
	blobs, err := NewDiskBlobs(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	g, err := New(Config{Blobs: blobs})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	site := Site{User: "bob", SharedHome: true}
	for body, sid := range map[string]string{
		`{"prompt":{},"client_id":"x","client_id":"alice"}`:                  "alice",
		`{"prompt":{},"extra_data":{"client_id":"alice"}}`:                   "alice",
		`{"prompt":{},"client_id":"tab","extra_data":{"client_id":"alice"}}`: "tab",
		`{"prompt":{}}`:               "",
		`{"prompt":{},"client_id":5}`: "",
	} {
		r := httptest.NewRequest(http.MethodPost, "/prompt", strings.NewReader(body))
		w := httptest.NewRecorder()
		if !g.ownHomePrompt(w, r, site) {
			t.Fatalf("%s refused: %d %s", body, w.Code, w.Body)
		}
		b, _ := io.ReadAll(r.Body)
		var m map[string]any
		if json.Unmarshal(b, &m) != nil || m["client_id"] != SharedSID("bob", sid) || strings.Count(string(b), "client_id") > 2 ||
			r.ContentLength != int64(len(b)) {
			t.Errorf("%s passed on as %s (want client_id %s)", body, b, SharedSID("bob", sid))
		}
	}
	r := httptest.NewRequest(http.MethodPost, "/prompt", strings.NewReader(`[1]`))
	w := httptest.NewRecorder()
	if g.ownHomePrompt(w, r, site) || w.Code != 400 {
		t.Errorf("a body that is not an object: %d %s", w.Code, w.Body)
	}
}
