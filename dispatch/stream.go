package dispatch

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"time"

	"github.com/gorilla/websocket"
	"go.uber.org/zap"

	"github.com/comfyume/comfyume/comfy"
)

// Events can arrive before the POST /prompt answer that tells the gateway
// an older server's own id for the job (a server that ignores the
// gateway's prompt_id): they are kept as orphans until the id is known.
// maxOrphans bounds the ids kept and maxOrphanBytes what they weigh in all
// (previews included: a fast GPU sends its first ones before the answer).
const (
	maxOrphans     = 512
	maxOrphanBytes = 16 << 20
)

// ensureStream makes sure the upstream's event WebSocket is open, dialing it
// if needed, and waits until it is.
func (u *Upstream) ensureStream(ctx context.Context) error {
	u.mu.Lock()
	if u.closed {
		u.mu.Unlock()
		return errors.New("upstream closed")
	}
	if u.ready == nil {
		u.ready = make(chan struct{})
		u.dialErr = nil
		go u.streamLoop(u.ready)
	}
	ready := u.ready
	u.mu.Unlock()
	select {
	case <-ready:
	case <-ctx.Done():
		return ctx.Err()
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.conn == nil {
		err := u.dialErr
		if err == nil {
			err = errors.New("event stream closed")
		}
		return err
	}
	return nil
}

// streamLoop dials the event socket and reads it until it fails; then it
// redials while jobs still run here, and gives them up after lostAfter.
func (u *Upstream) streamLoop(ready chan struct{}) {
	var firstFailure time.Time
	backoff := 100 * time.Millisecond
	readyOnce := func() {
		select {
		case <-ready:
		default:
			close(ready)
		}
	}
	// What the reader handled itself and delivered later, or lent; flushed
	// and released before each read from the connection (wsReader.release).
	rb := &readBatch{}
	dialer, lastConn := u.streamDialer()
	for attempt := 0; ; attempt++ {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		conn, err := u.DialWebSocketWith(ctx, dialer, "/ws?clientId="+u.clientID)
		cancel()
		var fr *wsReader
		if err == nil {
			fr = &wsReader{br: bufio.NewReaderSize(lastConn(), streamReadBuffer), control: answerControl(conn), release: rb.flush}
			// Ask for type-4 previews (with node and prompt ids).
			err = conn.WriteMessage(websocket.TextMessage, []byte(`{"type":"feature_flags","data":{"supports_preview_metadata":true}}`))
		}
		if err == nil {
			// ComfyUI greets a socket once it has registered its sid; events
			// of prompts queued before that would go nowhere.
			_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
			var greeting []byte
			greeting, err = u.readGreeting(fr)
			_ = conn.SetReadDeadline(time.Time{})
			if err == nil && greeting != nil {
				u.onText(greeting, false, nil)
			}
		}
		if err != nil {
			if conn != nil {
				conn.Close()
			}
			u.mu.Lock()
			u.dialErr = err
			u.mu.Unlock()
			if attempt == 0 {
				readyOnce()
			}
			if firstFailure.IsZero() {
				firstFailure = time.Now()
			}
			if u.giveUp(firstFailure, err) {
				return
			}
			time.Sleep(backoff)
			if backoff < 2*time.Second {
				backoff *= 2
			}
			continue
		}
		u.mu.Lock()
		u.conn = conn
		u.dialErr = nil
		reconnect := attempt > 0
		u.mu.Unlock()
		readyOnce()
		if reconnect {
			u.logger.Info("event stream reconnected")
			u.resyncRuns()
		}
		firstFailure = time.Time{}
		backoff = 100 * time.Millisecond
		err = u.readStream(fr, rb)
		u.mu.Lock()
		u.conn = nil
		u.running = ""
		u.mu.Unlock()
		conn.Close()
		u.logger.Warn("event stream lost", zap.Error(err))
		firstFailure = time.Now()
		if u.giveUp(firstFailure, err) {
			return
		}
	}
}

// DefaultLostTimeout is how long an upstream's event stream may stay down
// before the jobs running there are given up as failed.
const DefaultLostTimeout = 15 * time.Second

// giveUp decides, after a failure, whether the loop ends: when no job runs
// here (the stream is redialed on demand), or when the upstream's event
// stream has been down for its LostTimeout. Then each job is looked up over
// plain HTTP: one that ended meanwhile is finished from its history entry;
// one still queued or running there is kept (the stream keeps being
// redialed, and the job looked up again); the others fail, or move to
// another endpoint if they had not started.
func (u *Upstream) giveUp(since time.Time, err error) bool {
	u.mu.Lock()
	if u.closed || len(u.routes) == 0 {
		u.ready = nil
		u.mu.Unlock()
		return true
	}
	if time.Since(since) < u.LostTimeout {
		u.mu.Unlock()
		return false
	}
	runs := make([]*run, 0, len(u.routes))
	seen := map[*run]bool{}
	for _, r := range u.routes {
		if !seen[r] { // routed under two ids (an older server's own id)
			seen[r] = true
			runs = append(runs, r)
		}
	}
	u.mu.Unlock()
	var lost []*run
	for _, r := range runs {
		switch r.resync() {
		case stateEnded, stateActive:
		default:
			lost = append(lost, r)
		}
	}
	u.mu.Lock()
	for id, r := range u.routes {
		for _, l := range lost {
			if r == l {
				delete(u.routes, id)
			}
		}
	}
	keep := len(u.routes) > 0 && !u.closed
	if !keep {
		u.ready = nil
	}
	u.mu.Unlock()
	for _, r := range lost {
		if r.m.failover(r, u, err) {
			continue
		}
		r.fail(PublicMessage(r.job.Pool, "Lost the connection to the GPU server of pool "+r.job.Pool+": "+err.Error()))
	}
	return !keep
}

// readStream reads the upstream's frames until the connection fails. A
// frame over its limit is discarded as it is read (never buffered whole)
// and logged once per job; the connection and its other jobs go on.
//
// Events the reader handled itself (run.offer) are flushed to the browser,
// and what it lent of its memory released, before it next reads from the
// connection (wsReader.release), so one read's events go out in one write,
// and a lone event at once.
func (u *Upstream) readStream(fr *wsReader, rb *readBatch) error {
	defer rb.flush()
	for {
		typ, b, owned, over, err := fr.next(u.frameLimit)
		if err != nil {
			return err
		}
		if over {
			u.oversized(typ, b, u.frameLimit(typ))
			continue
		}
		switch typ {
		case websocket.TextMessage:
			u.onText(b, owned, rb)
		case websocket.BinaryMessage:
			u.onBinary(b, owned, rb)
		}
	}
}

// frameLimit is the largest frame of a type the stream accepts (set with
// its defaults by NewUpstream, so never 0).
func (u *Upstream) frameLimit(typ int) int64 {
	if typ == websocket.BinaryMessage {
		return u.maxBinary.Load()
	}
	return u.maxText.Load()
}

// readGreeting reads the server's first frame (within the JSON event
// limit; nil if it was over). It is valid until the next read.
func (u *Upstream) readGreeting(fr *wsReader) ([]byte, error) {
	_, b, _, over, err := fr.next(u.frameLimit)
	if over {
		return nil, err
	}
	return b, err
}

// oversized logs a skipped frame, once per job the server runs.
func (u *Upstream) oversized(typ int, head []byte, limit int64) {
	u.mu.Lock()
	job := u.running
	first := u.oversizeJob != job || !u.oversizeLogged
	u.oversizeJob, u.oversizeLogged = job, true
	u.mu.Unlock()
	if !first {
		return
	}
	kind := "event"
	if typ == websocket.BinaryMessage {
		kind = "binary frame"
		head = nil
	}
	u.logger.Warn("skipping an upstream "+kind+" over the size limit (further ones of this job are skipped silently)",
		zap.String("upstream_prompt_id", job), zap.Int64("limit", limit), zap.ByteString("start", truncate(head, 120)))
}

// onText routes a JSON event by what comfy.ScanEvent reads of it.
// b is lent by the reader (valid until it releases) unless owned.
func (u *Upstream) onText(b []byte, owned bool, rb *readBatch) {
	h, ok := u.scan.Scan(b)
	if !ok {
		u.logger.Warn("skipping malformed event", zap.ByteString("frame", truncate(b, 200)))
		return
	}
	switch h.Type {
	case comfy.MsgStatus, comfy.MsgFeatureFlags, "crystools.monitor", "logs":
		return
	}
	u.mu.Lock()
	pid := h.PromptID
	if pid == "" {
		pid = u.running
	}
	switch {
	case h.Type == comfy.MsgExecutionStart:
		u.running = pid
	case comfy.IsTerminal(h.Type) && u.running == pid:
		u.running = ""
	}
	ev := event{json: b, head: h, lent: !owned}
	r := u.routeLocked(pid, &ev)
	u.mu.Unlock()
	if r != nil {
		r.offer(&ev, rb)
	}
}

func (u *Upstream) onBinary(b []byte, owned bool, rb *readBatch) {
	if t, ok := comfy.BinaryType(b); ok && t != comfy.BinaryPreviewImage && t != comfy.BinaryText && t != comfy.BinaryPreviewImageWithMetadata {
		return // a type the frontend does not know either
	}
	ev, pid, ok := binaryEvent(b)
	if !ok {
		u.logger.Warn("skipping malformed binary frame", zap.ByteString("start", truncate(b, 16)))
		return
	}
	ev.lent = !owned
	u.mu.Lock()
	if pid == "" {
		pid = u.running
	}
	r := u.routeLocked(pid, &ev)
	u.mu.Unlock()
	if r != nil {
		r.offer(&ev, rb)
	}
}

// binaryEvent reads a preview or progress-text frame and the prompt_id it
// names ("" for none). ok is false for frames of unknown types and
// malformed ones.
func binaryEvent(b []byte) (ev event, pid string, ok bool) {
	t, ok := comfy.BinaryType(b)
	if !ok {
		return ev, "", false
	}
	switch t {
	case comfy.BinaryPreviewImage, comfy.BinaryPreviewImageWithMetadata:
		p, err := comfy.ParsePreview(b)
		if err != nil {
			return ev, "", false
		}
		if p.Metadata != nil {
			pid = p.Metadata.PromptID
		}
		ev.preview = &p
	case comfy.BinaryText:
		tf, err := comfy.ParseText(b, false)
		if err != nil {
			return ev, "", false
		}
		ev.text = &tf
	default:
		return ev, "", false
	}
	return ev, pid, true
}

// routeLocked returns the run that follows pid, which the caller offers
// the event once u.mu is unlocked; an event of a job nobody follows here
// (yet) is kept for it, within bounds, and nil is returned.
func (u *Upstream) routeLocked(pid string, ev *event) *run {
	if pid == "" {
		return nil
	}
	if r, ok := u.routes[pid]; ok {
		return r
	}
	if ev.json != nil && ev.head.Type == comfy.MsgExecuting && ev.head.NodeKind == comfy.NodeNull {
		// The end marker of a job nobody follows here is not kept: a job
		// routed later under its prompt_id would take it for its own end
		// and read another job's history. (A job followed again after its
		// end reads its history once routed; the marker is not needed.)
		return nil
	}
	q, known := u.orphans[pid]
	if !known && len(u.orphans) >= maxOrphans {
		for k := range u.orphans {
			u.dropOrphansLocked(k)
			break
		}
	}
	if size := ev.size(); u.orphanBytes+size <= maxOrphanBytes {
		ev.own(nil) // (kept long: not in the reader's slab)
		u.orphans[pid] = append(q, *ev)
		u.orphanBytes += size
	}
	return nil
}

// dropOrphansLocked forgets the events kept for pid.
func (u *Upstream) dropOrphansLocked(pid string) {
	for i := range u.orphans[pid] {
		u.orphanBytes -= u.orphans[pid][i].size()
	}
	delete(u.orphans, pid)
}

// register routes the upstream's events for pid to r, delivering any that
// arrived before.
func (u *Upstream) register(pid string, r *run) {
	u.setLimits(r.m.eventLimits())
	u.mu.Lock()
	defer u.mu.Unlock()
	u.routes[pid] = r
	for _, ev := range u.orphans[pid] {
		r.push(ev)
	}
	u.dropOrphansLocked(pid)
}

func (u *Upstream) unregister(pid string, r *run) {
	u.mu.Lock()
	if u.routes[pid] == r {
		delete(u.routes, pid)
	}
	u.dropOrphansLocked(pid)
	idle := u.retired && len(u.routes) == 0
	u.mu.Unlock()
	if idle {
		u.Close()
	}
}

// retire marks an upstream replaced by a config reload: it takes no new
// jobs' events and closes when its running jobs are done.
func (u *Upstream) retire() {
	u.mu.Lock()
	u.retired = true
	idle := len(u.routes) == 0
	u.mu.Unlock()
	if idle {
		u.Close()
	}
}

// isRunning reports whether the server is executing pid, as far as its
// events tell.
func (u *Upstream) isRunning(pid string) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.running == pid
}

// resyncRuns is called after the event stream was re-opened: events sent
// while it was down are lost, so each job still routed here reads its
// history entry and finishes from it if the server already did.
func (u *Upstream) resyncRuns() {
	u.mu.Lock()
	runs := make([]*run, 0, len(u.routes))
	for _, r := range u.routes {
		runs = append(runs, r)
	}
	u.mu.Unlock()
	for _, r := range runs {
		go r.resync()
	}
}

// Close stops the event stream.
func (u *Upstream) Close() {
	u.mu.Lock()
	u.closed = true
	c := u.conn
	u.mu.Unlock()
	if c != nil {
		c.Close()
	}
}

// historyEntry is the part of a /history/{id} entry used to finish a job
// whose events were missed.
type historyEntry struct {
	Outputs map[string]json.RawMessage `json:"outputs"`
	Status  struct {
		StatusStr string            `json:"status_str"`
		Completed bool              `json:"completed"`
		Messages  []json.RawMessage `json:"messages"`
	} `json:"status"`
}

// clip returns a copy of b's first n bytes at most.
func clip(b []byte, n int) []byte {
	return append([]byte(nil), truncate(b, n)...)
}

func truncate(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}
