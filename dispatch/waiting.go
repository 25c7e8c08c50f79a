package dispatch

import (
	"context"
	"fmt"
	"time"

	"github.com/comfyume/comfyume/comfy"
)

// Waiting notices. Every job that waits for a pool — queued behind busy
// endpoints, behind its user's max_running, behind a pool with no endpoint
// up, or held out of the queue between tries of a cold start — is told why
// and where it stands in the pool's order, under its output node (a
// progress-text frame, which every frontend draws) and, for browsers that
// declared the current frontend's features, as the `notification` the
// current frontend shows as the job's "initializing" state (relay decides
// per socket).
//
// One goroutine per gateway looks at this gateway's waiting jobs when
// something changed here (a prompt came, a job ended, a send failed) and
// every waitNoticeEvery besides (another replica's job started, time
// passed), never twice within waitNoticeGap: a change seen while it waits
// is told at the next look, together with everything else that changed.
// A job is told only when its text differs from what it was told last, so
// a queue of a hundred jobs that moves up by one costs one notice per job,
// however many prompts arrived meanwhile. With a shared queue (Valkey) the
// positions are read from it once per pool and look, and each gateway
// tells the jobs it holds; their browsers get the notices on whichever
// replica their sockets are (the event bus).

const (
	// waitNoticeGap is the shortest time between two looks.
	waitNoticeGap = 500 * time.Millisecond
	// waitNoticeEvery is how often waiting jobs are looked at when
	// nothing changed on this gateway.
	waitNoticeEvery = 2 * time.Second
	// waitNoticeRepeat is how often a job whose notice did not change is
	// told again (a browser that reconnected, or opened another tab, has
	// not seen it).
	waitNoticeRepeat = 20 * time.Second
)

// waitNotices owns the waiting notices: the goroutine that tells this
// gateway's waiting jobs why they wait, what it told each last, and the
// pokes that make it look. It reads the runs, the pools and their queues,
// and tells through the Events; it points to nothing else.
type waitNotices struct {
	runs   *runSet
	pools  *poolSet
	queues *poolQueues
	events Events

	poke chan struct{}
	// told is what each waiting job was told last, and when (only the
	// notice goroutine touches it; jobs that stopped waiting are dropped).
	told map[string]toldNotice
}

type toldNotice struct {
	why string
	at  time.Time
}

func newWaitNotices(runs *runSet, pools *poolSet, queues *poolQueues, events Events) *waitNotices {
	return &waitNotices{runs: runs, pools: pools, queues: queues, events: events,
		poke: make(chan struct{}, 1), told: map[string]toldNotice{}}
}

// pokeWaiting asks for a look at the waiting jobs soon. It never blocks.
func (w *waitNotices) pokeWaiting() {
	select {
	case w.poke <- struct{}{}:
	default:
	}
}

// tellWaiting tells waiting jobs why they wait until ctx ends.
func (w *waitNotices) tellWaiting(ctx context.Context) {
	t := time.NewTicker(waitNoticeEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.poke:
		case <-t.C:
		}
		w.noticeWaiting(ctx, time.Now())
		select {
		case <-ctx.Done():
			return
		case <-time.After(waitNoticeGap):
		}
	}
}

// waiter is a job of this gateway that waits, as the notices need it.
type waiter struct {
	r        *run
	job      Job // ID, User, ClientID, OutputsToExecute
	attempts int
	firstTry time.Time
}

// noticeWaiting tells each waiting job of this gateway why it waits, if
// that changed since it was last told.
func (w *waitNotices) noticeWaiting(ctx context.Context, now time.Time) {
	runs := w.runs.list()
	byPool := map[string][]waiter{}
	for _, r := range runs {
		r.mu.Lock()
		if r.waitingLocked() {
			j := r.job
			byPool[j.Pool] = append(byPool[j.Pool], waiter{r: r, attempts: r.attempts, firstTry: r.firstTry,
				job: Job{ID: j.ID, User: j.User, ClientID: j.ClientID, OutputsToExecute: j.OutputsToExecute}})
		}
		r.mu.Unlock()
	}
	told := make(map[string]toldNotice, len(w.told))
	for name, ws := range byPool {
		p, ok := w.pools.get(name)
		if !ok {
			continue
		}
		positions, running := w.queues.view(ctx, p)
		p.mu.Lock()
		held := make(map[*run]bool, len(p.held))
		for r := range p.held {
			held[r] = true
		}
		p.mu.Unlock()
		up := false
		for _, u := range p.Upstreams {
			if u.Healthy() {
				up = true
				break
			}
		}
		for _, wr := range ws {
			pos, queued := positions[wr.job.ID]
			why, ok := waitWhy(p, wr.job.User, held[wr.r], wr.attempts, wr.firstTry, pos, queued, up, running, now)
			if !ok {
				continue // being sent, handed over or put back: not waiting in a line
			}
			last := w.told[wr.job.ID]
			if last.why == why && now.Sub(last.at) < waitNoticeRepeat {
				told[wr.job.ID] = last
				continue
			}
			told[wr.job.ID] = toldNotice{why, now}
			wr.r.mu.Lock()
			still := wr.r.waitingLocked()
			wr.r.mu.Unlock()
			if still {
				w.tellWaiter(&wr.job, why)
			}
		}
	}
	w.told = told
}

// waitWhy says why a job of user waits for pool p, in the words its user
// is told ("Waiting for <why>…"), with its place in line: held for a
// cold-start retry (attempts so far, since firstTry), queued at pos
// (queued: it has a place) behind a pool with no endpoint up, behind the
// user's max_running (running counts each user's jobs on the pool), or
// for a free endpoint. ok is false for a job neither held nor queued: it
// is being sent, handed over or put back.
func waitWhy(p *Pool, user string, held bool, attempts int, firstTry time.Time, pos int, queued, up bool, running map[string]int, now time.Time) (why string, ok bool) {
	switch {
	case held:
		why = "a GPU server to start"
		if waited := now.Sub(firstTry); !firstTry.IsZero() && waited >= 5*time.Second {
			why += fmt.Sprintf(" (%s so far, attempt %d)", waited.Truncate(5*time.Second), attempts)
		} else if attempts > 0 {
			why += fmt.Sprintf(" (attempt %d)", attempts)
		}
	case !queued:
		return "", false
	case !up:
		why = "a GPU server to start"
	case p.MaxRunning > 0 && running[user] >= p.MaxRunning:
		if p.MaxRunning == 1 {
			why = "your running job to end (one at a time per person)"
		} else {
			why = fmt.Sprintf("one of your running jobs to end (%d at a time per person)", p.MaxRunning)
		}
	default:
		why = "a free GPU server"
	}
	if queued && pos > 0 {
		why += " — " + inLine(pos)
	}
	return why, true
}

// waitingLocked reports whether the run waits for an endpoint of its pool
// (queued, or held for a cold start). Call with r.mu held.
func (r *run) waitingLocked() bool {
	return !r.finished && r.up == nil && r.slot == nil && r.cancelRun == nil &&
		r.job.Status == StatusPending && r.job.Pool != ""
}

// tellWaiter sends a waiting job's notice: "Waiting for <why>…" under its
// output node, and the notification the current frontend takes as the
// job's "initializing" state (it looks for "Waiting for a machine" in it).
func (w *waitNotices) tellWaiter(j *Job, why string) {
	notify(w.events, j, "Waiting for "+why+"…")
	n := comfy.NewMessage(comfy.MsgNotification, map[string]any{"value": "Waiting for a machine (" + why + ")…", "id": j.ID})
	w.events.Deliver(recipientOf(j), jobMessage(n))
}

// inLine says a place in a queue in words: "next in line", "3rd in line".
func inLine(pos int) string {
	if pos == 1 {
		return "next in line"
	}
	suffix := "th"
	switch {
	case pos%100 >= 11 && pos%100 <= 13:
	case pos%10 == 1:
		suffix = "st"
	case pos%10 == 2:
		suffix = "nd"
	case pos%10 == 3:
		suffix = "rd"
	}
	return fmt.Sprintf("%d%s in line", pos, suffix)
}
