package relay

import (
	"fmt"
	"strings"
	"testing"
)

// A user whose jobs name many made-up clientIds (sessions no tab has
// opened) cannot make the gateway keep more than userBacklogBytes for
// them in all, however many sessions; another user's sessions keep theirs,
// and a tab that opens one of them gets what it kept.
func TestSessionsWithoutSocketsAreBoundedPerUser(t *testing.T) {
	h := NewHub()
	defer h.Close()
	big := []byte(`{"type":"executed","data":{"prompt_id":"p","node":"9","output":{"text":["` + strings.Repeat("x", 1<<20) + `"]}}}`)
	for i := 0; i < 100; i++ { // 100 sessions × 1 MiB
		h.publishLocal("mallory", fmt.Sprintf("made-up-%d", i), frame{text: big}, startNow)
	}
	h.publishLocal("alice", "tab", frame{text: big}, startNow)

	h.mu.Lock()
	kept := 0
	for k, se := range h.sessions {
		if k.user == "mallory" {
			kept += se.bytes
		}
	}
	counted := h.backlog["mallory"]
	h.mu.Unlock()
	if kept > userBacklogBytes || kept != counted {
		t.Fatalf("mallory's sessions keep %d bytes (counted %d), bound %d", kept, counted, userBacklogBytes)
	}
	if kept < userBacklogBytes-2*len(big) {
		t.Fatalf("mallory's sessions keep only %d bytes", kept)
	}
	s := newSocket(1 << 20)
	if missed := h.attach("alice", "tab", s); len(missed) != 1 {
		t.Fatalf("alice's tab got %d kept frames, want 1", len(missed))
	}
	s2 := newSocket(1 << 20)
	if missed := h.attach("mallory", "made-up-0", s2); len(missed) != 1 {
		t.Fatalf("mallory's first session gave %d kept frames, want 1", len(missed))
	}
	h.mu.Lock()
	after := h.backlog["mallory"]
	h.mu.Unlock()
	if after != counted-len(big) {
		t.Fatalf("after a tab took its frames mallory's count is %d, want %d", after, counted-len(big))
	}
}
