package caddymodule_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/comfyume/comfyume/comfytest"
)

// waitText is what a progress-text frame (type 3, legacy layout: node id
// length, node id, text) says; "" for other frames.
func waitText(f wsFrame) string {
	if f.text || f.binary != 3 || len(f.data) < 8 {
		return ""
	}
	n := int(f.data[4])<<24 | int(f.data[5])<<16 | int(f.data[6])<<8 | int(f.data[7])
	if 8+n > len(f.data) {
		return ""
	}
	return string(f.data[8+n:])
}

// ordinal is how a notice names a place in line.
func ordinal(pos int) string {
	switch pos {
	case 1:
		return "next in line"
	case 2:
		return "2nd in line"
	case 3:
		return "3rd in line"
	}
	if pos%10 == 1 && pos%100 != 11 {
		return fmt.Sprintf("%dst in line", pos)
	}
	if pos%10 == 2 && pos%100 != 12 {
		return fmt.Sprintf("%dnd in line", pos)
	}
	if pos%10 == 3 && pos%100 != 13 {
		return fmt.Sprintf("%drd in line", pos)
	}
	return fmt.Sprintf("%dth in line", pos)
}

// seen collects what one browser was told about waiting jobs.
type seen struct {
	texts         []string            // progress texts, in order
	notes         map[string][]string // job id → notification values, in order
	notifications int                 // notification frames (with or without id)
	started       map[string]bool     // jobs whose execution_start came
}

func (s *seen) add(f wsFrame) {
	if t := waitText(f); t != "" {
		s.texts = append(s.texts, t)
	}
	if f.text && f.Type == "execution_start" {
		if s.started == nil {
			s.started = map[string]bool{}
		}
		s.started[f.str("prompt_id")] = true
	}
	if f.text && f.Type == "notification" {
		s.notifications++
		if s.notes == nil {
			s.notes = map[string][]string{}
		}
		id := f.str("id")
		s.notes[id] = append(s.notes[id], f.str("value"))
	}
}

func (s *seen) hasText(sub string) bool {
	for _, t := range s.texts {
		if strings.Contains(t, sub) {
			return true
		}
	}
	return false
}

// lastNote is the latest notification value for a job.
func (s *seen) lastNote(id string) string {
	if v := s.notes[id]; len(v) > 0 {
		return v[len(v)-1]
	}
	return ""
}

// readUntil reads the browser's frames into s until done says so.
func (b *browser) readUntil(s *seen, d time.Duration, what string, done func() bool) {
	b.t.Helper()
	deadline := time.Now().Add(d)
	for !done() {
		if time.Now().After(deadline) {
			b.t.Fatalf("not told within %v: %s\ntexts %q\nnotifications %v", d, what, s.texts, s.notes)
		}
		s.add(b.next(time.Until(deadline)))
	}
}

// positionOf is a job's queue_position as /api/jobs lists it.
func (g *gateway) positionOf(user, id string) int {
	g.t.Helper()
	var page jobsPage
	g.getJSON(user, "/api/jobs?status=pending&limit=200", &page)
	j := findJob(page.Jobs, id)
	if j == nil {
		g.t.Fatalf("%s is not pending: %v", id, page.Jobs)
	}
	p, _ := j["queue_position"].(float64)
	return int(p)
}

// Every job waiting behind a busy GPU is told why and where it stands, not
// only the head of the queue, and told again when it moves up. The current
// frontend (it declared its feature flags) also gets the notification that
// shows the job as "initializing"; an older one gets only the text under
// the node.
func TestEveryWaitingJobIsToldWhy(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 20 * time.Millisecond})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	alice := g.openBrowser("alice", "", true)                                      // the current frontend
	bob := g.openBrowserFlags("bob", "", `{"supports_preview_metadata":true}`)     // an older one
	carol := g.openBrowserFlags("carol", "", `{"supports_preview_metadata":true}`) // (runs first)
	busy := g.queue("carol", carol.SID, samplerWorkflow("busy", 10_000)).PromptID  // holds the GPU until cancelled
	g.waitStatus("carol", busy, "in_progress", 30*time.Second)

	b1 := g.queue("bob", bob.SID, samplerWorkflow("b", 10_000)).PromptID
	a1 := g.queue("alice", alice.SID, samplerWorkflow("a1", 1)).PromptID
	a2 := g.queue("alice", alice.SID, samplerWorkflow("a2", 1)).PromptID
	pb1, pa1, pa2 := g.positionOf("bob", b1), g.positionOf("alice", a1), g.positionOf("alice", a2)
	if pb1 != 1 || pa1 != 2 || pa2 != 3 {
		t.Fatalf("positions: bob %d, alice %d %d", pb1, pa1, pa2)
	}

	var sa, sb seen
	alice.readUntil(&sa, 20*time.Second, "alice's two waiting jobs, with their places", func() bool {
		return sa.hasText("Waiting for a free GPU server — 2nd in line") && sa.hasText("Waiting for a free GPU server — 3rd in line") &&
			strings.Contains(sa.lastNote(a1), "Waiting for a machine") && strings.Contains(sa.lastNote(a1), "2nd in line") &&
			strings.Contains(sa.lastNote(a2), "Waiting for a machine") && strings.Contains(sa.lastNote(a2), "3rd in line")
	})
	bob.readUntil(&sb, 20*time.Second, "bob's waiting job, next in line", func() bool {
		return sb.hasText("Waiting for a free GPU server — next in line")
	})

	// The GPU frees up: bob's job starts, alice's move up and are told so.
	if st, _, _ := g.do("carol", "POST", "/api/jobs/"+busy+"/cancel", nil); st != 200 {
		t.Fatalf("cancel: %d", st)
	}
	alice.readUntil(&sa, 20*time.Second, "alice's jobs moved up", func() bool {
		return strings.Contains(sa.lastNote(a1), "next in line") && strings.Contains(sa.lastNote(a2), "2nd in line") &&
			sa.hasText("Waiting for a free GPU server — next in line")
	})
	bob.readUntil(&sb, 20*time.Second, "bob's job started", func() bool { return sb.started[b1] })
	if sb.notifications != 0 {
		t.Fatalf("a frontend that did not declare the current flags got %d notifications: %v", sb.notifications, sb.notes)
	}
	if sa.notifications == 0 || len(sa.notes[b1]) != 0 {
		t.Fatalf("alice's notifications: %v", sa.notes)
	}
}

// A hundred jobs wait behind a busy GPU, queued user after user, so that
// each arrival pushes earlier users' later jobs further back. Each job ends
// up told its current place, and the notices are coalesced: a job is told
// a few times at most, not once per arrival that moved it.
func TestHundredWaitingJobsToldWithoutStorm(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 20 * time.Millisecond})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	carol := g.openBrowser("carol", "", true)
	busy := g.queue("carol", carol.SID, samplerWorkflow("busy", 10_000)).PromptID
	g.waitStatus("carol", busy, "in_progress", 30*time.Second)

	users := []string{"u0", "u1", "u2", "u3"}
	tabs := map[string]*browser{}
	ids := map[string][]string{}
	for _, u := range users {
		tabs[u] = g.openBrowser(u, "", true)
	}
	for _, u := range users {
		for i := 0; i < 25; i++ {
			ids[u] = append(ids[u], g.queue(u, tabs[u].SID, samplerWorkflow(u, 1)).PromptID)
		}
	}
	most := 0
	for _, u := range users {
		var page jobsPage
		g.getJSON(u, "/api/jobs?status=pending&limit=200", &page)
		want := map[string]string{}
		for _, id := range ids[u] {
			j := findJob(page.Jobs, id)
			if j == nil {
				t.Fatalf("%s's job %s is not pending", u, id)
			}
			p, _ := j["queue_position"].(float64)
			want[id] = "— " + ordinal(int(p)) + ")"
		}
		var s seen
		tabs[u].readUntil(&s, 30*time.Second, u+"'s jobs told their places", func() bool {
			for id, w := range want {
				if !strings.Contains(s.lastNote(id), w) {
					return false
				}
			}
			return true
		})
		for _, id := range ids[u] {
			most = max(most, len(s.notes[id]))
		}
	}
	t.Logf("most notices of one job: %d", most)
	// Without coalescing, u0's last job alone moves back 75 times.
	if most > 10 {
		t.Fatalf("a waiting job was told %d times while 100 jobs were queued", most)
	}
}

// With the queue in Valkey: alice's browser is on replica A, her job was
// queued through replica B (B holds it and tells it why it waits). She sees
// its reason and place, and the new place when a job started by replica A
// moves it up.
func TestWaitingNoticesAcrossReplicas(t *testing.T) {
	valkeyAddr, s3 := sharedEnv(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 20 * time.Millisecond})
	cf := sharedCaddyfile(testPrefix(), valkeyAddr, s3, home.URL(), gpu.URL(), "")
	a := startCaddy(t, cf)
	b := startReplica(t, cf)
	carol := a.openBrowserFlags("carol", "", `{"supports_preview_metadata":true}`)
	busy := a.queue("carol", carol.SID, samplerWorkflow("busy", 10_000)).PromptID
	a.waitStatus("carol", busy, "in_progress", 30*time.Second)
	bob := a.openBrowserFlags("bob", "", `{"supports_preview_metadata":true}`)
	b1 := a.queue("bob", bob.SID, samplerWorkflow("b", 10_000)).PromptID

	alice := a.openBrowser("alice", "", true)
	a1 := b.queue("alice", alice.SID, samplerWorkflow("a", 1)).PromptID
	if p := b.positionOf("alice", a1); p != 2 {
		t.Fatalf("alice's job is %d in line, want 2 (after bob's)", p)
	}
	var s seen
	alice.readUntil(&s, 20*time.Second, "her job's reason and place, from the other replica", func() bool {
		return strings.Contains(s.lastNote(a1), "a free GPU server — 2nd in line") && s.hasText("Waiting for a free GPU server — 2nd in line")
	})
	if st, _, _ := a.do("carol", "POST", "/api/jobs/"+busy+"/cancel", nil); st != 200 {
		t.Fatalf("cancel: %d", st)
	}
	a.waitStatus("bob", b1, "in_progress", 20*time.Second)
	alice.readUntil(&s, 20*time.Second, "her job moved up", func() bool {
		return strings.Contains(s.lastNote(a1), "next in line") && s.hasText("Waiting for a free GPU server — next in line")
	})
	if st, _, _ := a.do("bob", "POST", "/api/jobs/"+b1+"/cancel", nil); st != 200 {
		t.Fatalf("cancel: %d", st)
	}
	frames := alice.untilJobEnd(a1, 30*time.Second)
	if indexOf(frames, "execution_success") < 0 {
		t.Fatalf("alice's job: %v", types(frames))
	}
}

// A pool with no endpoint up: not only the jobs being tried (held for a
// cold start) are told why — those queued behind them are told too, with
// their places.
func TestJobsQueuedBehindColdPoolAreTold(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	dead := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	cf := strings.Replace(poolCaddyfile(home.URL(), dead, ""), "pool gpu {", "pool gpu {\n\t\t\tcold_start_timeout 2m", 1)
	g := startCaddy(t, cf)
	alice := g.openBrowser("alice", "", true)
	carol := g.openBrowser("carol", "", true)
	var held []string
	for i := 0; i < 3; i++ { // three failed sends open the endpoint's circuit
		held = append(held, g.queue("alice", alice.SID, samplerWorkflow(fmt.Sprint("a", i), 1)).PromptID)
	}
	c1 := g.queue("carol", carol.SID, samplerWorkflow("c1", 1)).PromptID
	c2 := g.queue("carol", carol.SID, samplerWorkflow("c2", 1)).PromptID
	var sa, sc seen
	alice.readUntil(&sa, 20*time.Second, "alice's jobs, held for the cold start", func() bool {
		for _, id := range held {
			if !strings.Contains(sa.lastNote(id), "a GPU server to start") {
				return false
			}
		}
		return sa.hasText("Waiting for a GPU server to start")
	})
	carol.readUntil(&sc, 20*time.Second, "carol's jobs, queued behind the cold pool", func() bool {
		for _, id := range []string{c1, c2} {
			if !strings.Contains(strings.Join(sc.notes[id], "\n"), "a GPU server to start") {
				return false
			}
		}
		return strings.Contains(strings.Join(sc.notes[c2], "\n"), "a GPU server to start — ") && sc.hasText(" in line")
	})
}
