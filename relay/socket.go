package relay

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"net"
	"net/http"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/gorilla/websocket"

	"github.com/comfyume/comfyume/comfy"
	"github.com/comfyume/comfyume/dispatch"
	"github.com/comfyume/comfyume/internal/fifo"
)

// Defaults of the per-socket limits (see Config).
const (
	DefaultMaxSocketsPerUser = 32
	DefaultMaxSocketQueue    = 4 << 20
)

// Timing of a socket that falls behind.
var (
	// writeWait bounds one write to a browser; a browser that cannot take
	// a batch in that time is cut off (it reconnects and gets the replay).
	writeWait = 10 * time.Second
	// queueGrace is how long a socket's queue may stay over its bound
	// (after coalescing) before the socket is closed.
	queueGrace = 10 * time.Second
	// closeWait bounds the last write of a closing socket (its close frame).
	closeWait = time.Second
)

// maxBatch is about how many bytes one write carries (a single larger
// frame goes alone), and maxBatchFrames how many frames: each is two
// buffers of a vectored write, and Linux takes 1024 at most per writev.
const (
	maxBatch       = 1 << 20
	maxBatchFrames = 500
)

// socket is one browser WebSocket connection and its outgoing queue.
//
// Frames for the browser are only ever queued (send, deliver, replay);
// whoever finds the queue idle becomes its writer: the hub starts a short-
// lived goroutine that writes everything queued in few writes and exits when
// the queue is empty, so an idle socket costs no goroutine. The socket's own
// goroutines (its home relay and its read loop) write inline instead (see
// write), so a frame that finds the socket idle goes out at once. Nobody
// else writes to the connection: gorilla's own control frames (pongs, close
// replies) are routed into the queue by browserConn.
type socket struct {
	conn     *websocket.Conn // reads the browser's frames; never writes
	out      net.Conn        // the connection; written only by the writer
	raw      syscall.RawConn // out's, for non-blocking writes (nil: none)
	vectored bool            // out takes a batch in one writev (a plain TCP connection)
	limit    int             // bytes queued before progress and previews coalesce

	mu sync.Mutex
	// queue is what waits; queue.At(i) is the frame at position base+i
	// (positions count every frame ever queued, so coalescing can name
	// one). Its chunks come from queueChunks and go back there as they
	// are written: an idle socket holds none.
	queue     fifo.Queue[queued]
	base      int
	bytes     int            // bytes of the live entries in queue
	dropped   int            // entries of queue superseded by newer ones
	latest    map[string]int // while over the bound: coalescing key → position
	overSince time.Time      // when the queue went over its bound (zero: it isn't)
	writing   bool           // a writer is at work
	lent      bool           // queue may hold lent frames (frame.lent)
	closing   bool           // no more frames: the socket closes once its queue is written
	dead      bool

	// With a bus: the replay position of the last frame queued, and while
	// missed frames are being replayed, live frames held back until then.
	lastPos     string
	recent      map[string]struct{} // positions delivered lately (dedupe)
	recentOrder []string
	holding     bool
	held        []heldFrame
	heldBytes   int

	previewMeta   bool // browser declared supports_preview_metadata
	currentUI     bool // browser declared the current frontend's features (see readBrowserFrame)
	homeRemaining int  // queue_remaining of the home server

	onClose func(reason string) // logs why the gateway closed the socket
}

// Kinds of queued frames, for coalescing.
const (
	kindKept     = iota // lifecycle events and anything unknown: never dropped
	kindProgress        // progress, progress_state, progress text: latest per node
	kindPreview         // previews: latest per node
)

// queued is one frame waiting in a socket's queue.
type queued struct {
	f       frame
	raw     []byte // a complete WebSocket frame (control frames), written as is
	size    int
	kind    uint8
	dropped bool
	key     string // coalescing key, once computed
}

func newSocket(limit int) *socket {
	if limit <= 0 {
		limit = DefaultMaxSocketQueue
	}
	return &socket{limit: limit, queue: fifo.Queue[queued]{Pool: &queueChunks}}
}

// How a frame queued on an idle socket gets its writer.
type writerStart uint8

const (
	startGoroutine writerStart = iota // a goroutine of its own, now
	startInline                       // the caller writes before it returns
	startNow                          // the caller writes what the connection takes at once, a goroutine the rest
	startLater                        // none yet: the caller kicks the socket when done queuing
)

// send queues a frame and returns at once; it never waits for the browser.
func (s *socket) send(f frame) {
	q := queued{f: f}
	s.push(&q, startGoroutine)
}

// write queues a frame and, when the socket is idle, writes it (and
// whatever else is queued) before returning. Only the socket's own
// goroutines call it: it may wait for this browser, never for another.
func (s *socket) write(f frame) {
	q := queued{f: f}
	s.push(&q, startInline)
}

// relay queues a frame from a stream that must never wait for this
// browser (home's socket, which home writes to every user's socket in
// turn) and writes what the connection takes at once; a goroutine writes
// the rest. A browser that falls behind gets the queue's bound (progress
// and previews squeezed, then the socket closed), not a stalled stream.
func (s *socket) relay(f frame) {
	q := queued{f: f}
	s.push(&q, startNow)
}

// sendRaw queues a complete WebSocket frame (a control frame).
func (s *socket) sendRaw(b []byte) {
	q := queued{raw: b}
	s.push(&q, startGoroutine)
}

// push queues an entry and, when the socket was idle, starts its writer
// as start says. (Entries go by pointer down to the writer, and are
// copied where they stay: a socket's own goroutines write inline, and
// their stacks, which grow for the deepest write, are most of an idle
// socket's memory.) A lent frame comes from the reader that lent it, who
// may write it from where it lies (writeLoop's lender).
func (s *socket) push(q *queued, start writerStart) {
	s.mu.Lock()
	ok, direct := s.enqueueLocked(q, start != startLater)
	s.mu.Unlock()
	switch {
	case !ok:
	case start == startInline || start == startNow:
		s.writeLoop(nil, q, direct, start == startNow, q.f.lender)
	default:
		s.goWrite(*q, direct)
	}
}

// goWrite starts a writer on a goroutine of its own, with first as
// writeLoop's.
func (s *socket) goWrite(first queued, direct bool) {
	first.f = first.f.own()
	go s.writeLoop(nil, &first, direct, false, nil)
}

// pushAll queues a job's events (and returns at once, never waiting for
// the browser): under one lock, unlike a push each. When the socket was
// idle, the caller becomes its writer as with startNow; the lent ones
// among them are lender's, written from where they lie, and copied when
// they must wait (releaseLent).
func (s *socket) pushAll(evs []dispatch.Event, lender *dispatch.Lender) {
	s.mu.Lock()
	for i := range evs {
		if f, ok := eventFrame(evs[i], lender); ok {
			q := queued{f: f}
			s.enqueueLocked(&q, false)
		}
	}
	s.releaseLentLocked(lender)
}

// releaseLent is how the upstream reader lender, or any caller with nil,
// starts the writer of frames it queued without one (startLater), before
// it reuses their memory: it writes what the connection takes at once
// from where the frames lie, and copies what is left (as it does when
// another writer is at work).
func (s *socket) releaseLent(lender *dispatch.Lender) {
	s.mu.Lock()
	s.releaseLentLocked(lender)
}

// releaseLentLocked is releaseLent with s.mu held, which it unlocks.
func (s *socket) releaseLentLocked(lender *dispatch.Lender) {
	if s.writing || s.dead || s.queue.Len() == 0 {
		s.ownLocked()
		s.mu.Unlock()
		return
	}
	s.writing = true
	s.mu.Unlock()
	s.writeLoop(nil, nil, false, true, lender)
}

// ownLocked copies the queued lent frames.
func (s *socket) ownLocked() {
	if !s.lent {
		return
	}
	for i := range s.queue.Len() {
		if q := s.queue.At(i); q.f.lender != nil {
			q.f = q.f.own()
		}
	}
	s.lent = false
}

// enqueueLocked adds an entry to the queue, coalescing when the queue is
// over its bound and closing the socket when that does not help. It
// reports whether the caller must start a writer: when the socket was idle
// (direct), the entry is not queued but handed to the writer
// (writeLoop(q, direct)). Unless mayStart, it only queues (the caller
// kicks the socket). It sets the entry's size and kind.
func (s *socket) enqueueLocked(q *queued, mayStart bool) (start, direct bool) {
	if s.dead || s.closing || !s.currentUI && isNotice(q.f.text) {
		return false, false
	}
	q.size, q.kind = classify(q)
	if mayStart && !s.writing && s.queue.Len() == 0 {
		s.writing = true
		return true, true
	}
	s.queue.Push(*q)
	s.bytes += q.size
	s.lent = s.lent || q.f.lender != nil
	if s.bytes > s.limit || s.latest != nil {
		s.squeezeLocked()
		switch {
		case s.bytes > 2*s.limit && s.queue.Len()-s.dropped > 1: // (a lone big frame goes through)
			s.closeLocked(websocket.ClosePolicyViolation, "browser too slow: too many events queued")
		case s.bytes <= s.limit:
			s.overSince = time.Time{}
		case s.overSince.IsZero():
			s.overSince = time.Now()
		case time.Since(s.overSince) > queueGrace:
			s.closeLocked(websocket.ClosePolicyViolation, "browser too slow: events queued for over "+queueGrace.String())
		}
	}
	if !mayStart || s.writing || s.queue.Len() == 0 {
		return false, false
	}
	s.writing = true
	return true, false
}

// queueChunks holds the queue chunks of every socket.
var queueChunks fifo.Pool[queued]

// releaseLocked empties the queue: its chunks go back to queueChunks, and
// the positions of its entries are gone.
func (s *socket) releaseLocked() {
	s.base += s.queue.Len()
	s.queue.Reset()
	s.dropped, s.latest, s.lent = 0, nil, false
}

// holdLocked keeps a live frame while the socket's missed frames are read
// (up to busTimeout), within the socket's queue bound as its queue would:
// past the bound progress and previews are dropped (the next ones show the
// state), and past twice it the socket is closed; the browser reconnects
// and catches up from the replay.
func (s *socket) holdLocked(f frame, pos string) {
	if s.closing || s.dead {
		return
	}
	q := queued{f: f}
	size, kind := classify(&q)
	switch {
	case kind != kindKept && s.heldBytes+size > s.limit:
	case s.heldBytes+size > 2*s.limit:
		s.held, s.heldBytes = nil, 0
		s.closeLocked(websocket.ClosePolicyViolation, "browser too slow: too many events while catching up")
	default:
		s.held = append(s.held, heldFrame{f.own(), pos})
		s.heldBytes += size
	}
}

// classify returns a queued entry's size and kind.
func classify(q *queued) (int, uint8) {
	f := q.f
	switch {
	case q.raw != nil:
		return len(q.raw), kindKept
	case f.text != nil && f.typed:
		return len(f.text), f.kind
	case f.text != nil:
		if t, ok := comfy.PeekType(f.text); ok && (t == comfy.MsgProgress || t == comfy.MsgProgressState) {
			return len(f.text), kindProgress
		}
		return len(f.text), kindKept
	case f.binary != nil:
		t, _ := comfy.BinaryType(f.binary)
		switch t {
		case comfy.BinaryText:
			return len(f.binary), kindProgress
		case comfy.BinaryPreviewImage, comfy.BinaryPreviewImageWithMetadata:
			return len(f.binary), kindPreview
		}
		return len(f.binary), kindKept
	case f.preview != nil:
		return len(f.preview.Image) + 256, kindPreview
	}
	return 0, kindKept
}

// coalesceKey names what a progress or preview frame is the latest state
// of: a node of a prompt. ok is false for frames that are kept anyway.
func coalesceKey(q *queued) (string, bool) {
	f := q.f
	switch {
	case f.text != nil:
		var m struct {
			Type string `json:"type"`
			Data struct {
				Node     any    `json:"node"`
				PromptID string `json:"prompt_id"`
			} `json:"data"`
		}
		if json.Unmarshal(f.text, &m) != nil {
			return "", false
		}
		if m.Type == comfy.MsgProgressState {
			return "s\x00" + m.Data.PromptID, true
		}
		node, _ := json.Marshal(m.Data.Node)
		return "p\x00" + m.Data.PromptID + "\x00" + string(node), true
	case f.binary != nil:
		if t, _ := comfy.BinaryType(f.binary); t == comfy.BinaryText {
			tf, err := comfy.ParseText(f.binary, false)
			if err != nil {
				return "", false
			}
			return "t\x00" + tf.NodeID, true
		}
		p, err := comfy.ParsePreview(f.binary)
		if err != nil {
			return "", false
		}
		return previewKey(&p), true
	case f.preview != nil:
		return previewKey(f.preview), true
	}
	return "", false
}

func previewKey(p *comfy.Preview) string {
	if p.Metadata == nil {
		return "v\x00"
	}
	return "v\x00" + p.Metadata.PromptID + "\x00" + p.Metadata.NodeID
}

// squeezeLocked coalesces the queue: of the progress and preview frames
// queued for one node, only the latest stays. The first call indexes the
// whole queue; later ones only the newest entry, until the queue drains.
func (s *socket) squeezeLocked() {
	if s.latest == nil {
		s.latest = map[string]int{}
		for i := range s.queue.Len() {
			s.coalesceLocked(i)
		}
	} else {
		s.coalesceLocked(s.queue.Len() - 1)
	}
	if s.dropped > 64 && s.dropped > s.queue.Len()/2 {
		s.compactLocked()
	}
}

func (s *socket) coalesceLocked(i int) {
	q := s.queue.At(i)
	if q.dropped || q.kind == kindKept {
		return
	}
	if q.key == "" {
		k, ok := coalesceKey(q)
		if !ok {
			q.kind = kindKept
			return
		}
		q.key = k
	}
	if prev, ok := s.latest[q.key]; ok && prev >= s.base && prev-s.base < i {
		old := s.queue.At(prev - s.base)
		s.bytes -= old.size
		*old = queued{dropped: true}
		s.dropped++
	}
	s.latest[q.key] = s.base + i
}

// compactLocked removes superseded entries from the queue.
func (s *socket) compactLocked() {
	live := fifo.Queue[queued]{Pool: &queueChunks}
	for {
		q, ok := s.queue.Pop()
		if !ok {
			break
		}
		s.base++ // positions of the old entries are all gone
		if !q.dropped {
			live.Push(q)
		}
	}
	s.queue, s.dropped = live, 0
	clear(s.latest)
	for i := range s.queue.Len() {
		if q := s.queue.At(i); q.key != "" {
			s.latest[q.key] = s.base + i
		}
	}
}

// closeLocked drops what is queued and closes the socket with a reason,
// once the write under way (if any) is done; the browser reconnects and
// gets what it missed from the replay.
func (s *socket) closeLocked(code int, reason string) {
	if s.dead || s.closing {
		return
	}
	s.releaseLocked()
	cf := closeFrame(code, reason)
	s.queue.Push(queued{raw: cf, size: len(cf)})
	s.bytes = len(cf)
	s.closing = true
	if s.out != nil {
		_ = s.out.SetWriteDeadline(time.Now().Add(closeWait))
	}
	if s.onClose != nil {
		s.onClose(reason)
	}
	if !s.writing {
		s.writing = true
		go s.writeLoop(nil, nil, false, false, nil)
	}
}

// finish ends the socket: frames already queued (a close reply) are
// written within closeWait, then the connection is closed.
func (s *socket) finish() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closing = true
	if s.writing {
		_ = s.out.SetWriteDeadline(time.Now().Add(closeWait))
		return
	}
	s.dieLocked()
}

// kill closes the connection now (on shutdown).
func (s *socket) kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dieLocked()
}

func (s *socket) dieLocked() {
	s.closing = true
	if !s.dead {
		s.dead = true
		if s.vectored {
			s.out.Close()
		} else {
			// TLS first sends a close alert, which may wait up to 5 s for
			// a browser that does not read: not under the socket's lock.
			go s.out.Close()
		}
	}
	s.releaseLocked()
	s.bytes = 0
}

// writeLoop writes first (if direct), then the queue until it is empty.
// The caller has set s.writing. With nonblock, the caller writes only what
// the connection takes at once: when the browser's socket buffer is full,
// a goroutine writes the rest and goes on, so the caller never waits; a
// connection that cannot be written without waiting (TLS) is written by a
// goroutine of its own from the start. lender says that the caller is the
// upstream reader that lent the queued lent frames: it writes them from
// where they lie, and copies them before a goroutine takes over; any
// other writer copies each lent frame as it takes it off the queue.
// sc is the scratch of a batch begun (its rest written already by resume),
// or nil. (One function for both: a socket's own goroutines write inline,
// and their stacks are most of an idle socket's memory.)
func (s *socket) writeLoop(sc *writeScratch, first *queued, direct, nonblock bool, lender *dispatch.Lender) {
	if nonblock && !s.vectored {
		s.handOff(first, direct)
		return
	}
	if sc == nil {
		sc = scratchPool.Get().(*writeScratch)
	}
	s.mu.Lock()
	for !s.dead && (direct || s.queue.Len() > 0) {
		// Take a batch off the front of the queue.
		batch := sc.batch[:0]
		if direct {
			batch = append(batch, *first)
			direct, first = false, nil
		} else {
			batch = s.takeLocked(batch, lender)
		}
		meta, wait := s.previewMeta, writeWait
		if s.closing {
			wait = closeWait
		}
		s.mu.Unlock()

		sc.build(batch, meta)
		bufs := sc.bufs
		var err error
		switch {
		case nonblock:
			var handed bool
			if handed, err = s.tryWrite(sc, wait, lender); handed {
				return
			}
		case s.vectored:
			_ = s.out.SetWriteDeadline(time.Now().Add(wait))
			sc.w = bufs // WriteTo consumes its receiver
			_, err = sc.w.WriteTo(s.out)
		default:
			// TLS and other wrapped connections would make a record and
			// a write of every header and payload: join them.
			_ = s.out.SetWriteDeadline(time.Now().Add(wait))
			flat := sc.flat[:0]
			for _, b := range bufs {
				flat = append(flat, b...)
			}
			_, err = s.out.Write(flat)
			if cap(flat) <= 64<<10 {
				sc.flat = flat[:0]
			}
		}
		sc.reset()
		s.mu.Lock()
		if err != nil {
			s.dieLocked()
		}
	}
	s.writing = false
	if s.closing {
		s.dieLocked()
	}
	s.mu.Unlock()
	if cap(sc.hdrs) > 2*maxCopied {
		sc.hdrs = nil // (preview heads of a batch of previews)
	}
	scratchPool.Put(sc) // (its batch and bufs are bounded by maxBatchFrames)
}

// takeLocked appends a batch off the front of the queue to batch, with
// copies of the lent frames unless the caller is their lender. (A
// function of its own, so that its locals are not on the stack under
// writeLoop's writes.)
//
//go:noinline
func (s *socket) takeLocked(batch []queued, lender *dispatch.Lender) []queued {
	size := 0
	for s.queue.Len() > 0 && len(batch) < maxBatchFrames && (size == 0 || size+s.queue.At(0).size <= maxBatch) {
		q, _ := s.queue.Pop()
		s.base++
		if q.dropped {
			s.dropped--
		} else {
			if q.f.lender != nil && q.f.lender != lender {
				q.f = q.f.own()
			}
			batch = append(batch, q)
			size += q.size
		}
	}
	s.bytes -= size
	if s.queue.Len() == 0 {
		s.dropped, s.latest, s.lent = 0, nil, false
	}
	if s.bytes <= s.limit {
		s.overSince = time.Time{}
	}
	return batch
}

// tryWrite writes sc.bufs as far as the connection takes them at once;
// when it does not take them all, a goroutine writes the rest and goes on
// with the queue (handed). A lender first copies what it lent: the rest
// of the batch, and what is queued.
//
//go:noinline
func (s *socket) tryWrite(sc *writeScratch, wait time.Duration, lender *dispatch.Lender) (handed bool, err error) {
	rest, err := tryWritev(s.raw, &sc.wv, sc.bufs)
	if err == nil && len(rest) > 0 {
		if lender != nil {
			rest = ownRest(sc.batch, rest)
			s.mu.Lock()
			s.ownLocked()
			s.mu.Unlock()
		}
		sc.w = rest
		go s.resume(sc, wait)
		return true, nil
	}
	return false, err
}

// ownRest returns the unwritten rest of a batch as one buffer of its own
// when the batch holds lent frames, else rest itself.
func ownRest(batch []queued, rest net.Buffers) net.Buffers {
	for i := range batch {
		if batch[i].f.lender != nil {
			return net.Buffers{bytes.Join(rest, nil)}
		}
	}
	return rest
}

// handOff starts a writer on a goroutine of its own for a caller that must
// not wait (nonblock) on a connection that cannot be written without
// waiting: first (if direct) and the lent frames queued are copied for it.
// The caller has set s.writing.
//
//go:noinline
func (s *socket) handOff(first *queued, direct bool) {
	s.mu.Lock()
	s.ownLocked()
	s.mu.Unlock()
	var q queued
	if direct {
		q = *first
	}
	s.goWrite(q, direct)
}

// resume writes the rest of a batch that did not fit the browser's socket
// buffer (sc.w), then goes on writing the queue.
func (s *socket) resume(sc *writeScratch, wait time.Duration) {
	_ = s.out.SetWriteDeadline(time.Now().Add(wait))
	_, err := sc.w.WriteTo(s.out)
	sc.reset()
	if err != nil {
		s.mu.Lock()
		s.dieLocked()
		s.mu.Unlock()
	}
	s.writeLoop(sc, nil, false, false, nil)
}

// advance drops the first n bytes of b.
func advance(b net.Buffers, n int) net.Buffers {
	for len(b) > 0 && n >= len(b[0]) {
		n -= len(b[0])
		b = b[1:]
	}
	if len(b) > 0 {
		b[0] = b[0][n:]
	}
	return b
}

// writeScratch is a writer's working memory, reused across writers.
type writeScratch struct {
	batch []queued
	// bufs is the batch as the buffers of one write. hdrs holds the
	// frames' headers and the copies of small payloads; bufs[run] is the
	// part of it written last (run < 0: bufs ends with something else),
	// which the next header or copy extends (appendCopy).
	bufs net.Buffers
	hdrs []byte
	run  int
	w    net.Buffers
	flat []byte
	wv   writevState
}

// reset lets go of a written batch.
func (sc *writeScratch) reset() {
	clear(sc.bufs)
	clear(sc.batch)
	sc.bufs, sc.hdrs, sc.batch, sc.w, sc.run = sc.bufs[:0], sc.hdrs[:0], sc.batch[:0], nil, -1
}

var scratchPool = sync.Pool{New: func() any { return &writeScratch{run: -1} }}

// A batch goes out as few long buffers, not as a header and a payload
// per frame: the kernel pays for every buffer of a writev, and a batch
// of progress events written as 2 buffers each cost about 130 ns more per
// event than the same bytes in one (Linux, loopback TCP). So each frame's
// header is made in the scratch, payloads of up to copyFrame bytes are
// copied after it, and what lies back to back there is one buffer. Larger
// payloads (previews' images) are written from where they are. A batch
// copies up to maxCopied bytes; past that its payloads go by reference.
const (
	copyFrame = 2 << 10
	maxCopied = 64 << 10
)

// previewHead is room for a preview's head (type, metadata) in the
// scratch; a longer one still fits, but may begin a buffer of its own.
const previewHead = 512

// build makes the buffers of a batch, the scratch sized for it first.
func (sc *writeScratch) build(batch []queued, previewMeta bool) {
	sc.batch = batch
	n, copied := 0, 0
	for i := range batch {
		n += maxHeader
		size := len(batch[i].raw) + len(batch[i].f.text) + len(batch[i].f.binary)
		if p := batch[i].f.preview; p != nil {
			n += previewHead
			size = len(p.Image)
		}
		if size <= copyFrame {
			copied += size
		}
	}
	sc.room(n + min(copied, maxCopied))
	for i := range batch {
		sc.appendFrame(&batch[i], previewMeta)
	}
}

// appendFrame adds one queued frame, with its WebSocket header, to the
// batch's buffers.
func (sc *writeScratch) appendFrame(q *queued, previewMeta bool) {
	if q.raw != nil {
		sc.appendPayload(q.raw)
		return
	}
	op, payload := websocket.BinaryMessage, q.f.binary
	switch {
	case q.f.text != nil:
		op, payload = websocket.TextMessage, q.f.text
	case q.f.preview != nil:
		sc.appendPreview(q.f.preview, previewMeta)
		return
	}
	// Room for the header and, if it is copied, the payload first: the
	// two then lie in one array, back to back.
	n := maxHeader
	if sc.copies(payload) {
		n += len(payload)
	}
	sc.room(n)
	from := len(sc.hdrs)
	sc.hdrs = appendHeader(sc.hdrs, op, len(payload))
	sc.appendCopy(from)
	sc.appendPayload(payload)
}

// copies reports whether the payload p is copied into the scratch: it is
// small and the batch's copies are under their bound.
func (sc *writeScratch) copies(p []byte) bool {
	return len(p) <= copyFrame && len(sc.hdrs)+len(p) <= maxCopied
}

// maxHeader is the longest header of a server frame.
const maxHeader = 10

// room makes room for n more bytes in the scratch before they are
// written, so that a frame's header and copy stay in one array.
func (sc *writeScratch) room(n int) {
	if cap(sc.hdrs)-len(sc.hdrs) < n {
		sc.hdrs = slices.Grow(sc.hdrs, max(n, 4<<10))
	}
}

// appendPayload adds bytes of a frame: copied into the scratch when small
// (and the batch's copies are under their bound), else as a buffer of
// their own.
func (sc *writeScratch) appendPayload(p []byte) {
	if sc.copies(p) {
		sc.room(len(p))
		from := len(sc.hdrs)
		sc.hdrs = append(sc.hdrs, p...)
		sc.appendCopy(from)
		return
	}
	sc.appendRef(p)
}

// appendRef adds bytes of a frame as a buffer of their own.
func (sc *writeScratch) appendRef(p []byte) {
	if len(p) > 0 {
		sc.bufs = append(sc.bufs, p)
		sc.run = -1
	}
}

// appendCopy adds sc.hdrs[from:], just written there, to the batch: it
// extends the last buffer when that one ends where these bytes begin,
// else it becomes a buffer of its own. (Growing hdrs may have moved it:
// the buffers taken before keep the old array, and a new run begins.)
func (sc *writeScratch) appendCopy(from int) {
	if from == len(sc.hdrs) {
		return
	}
	if sc.run >= 0 && sc.run == len(sc.bufs)-1 {
		last := sc.bufs[sc.run]
		if start := from - len(last); start >= 0 && &sc.hdrs[start] == &last[0] {
			sc.bufs[sc.run] = sc.hdrs[start:len(sc.hdrs):len(sc.hdrs)]
			return
		}
	}
	sc.bufs = append(sc.bufs, sc.hdrs[from:len(sc.hdrs):len(sc.hdrs)])
	sc.run = len(sc.bufs) - 1
}

// appendPreview adds a preview frame: its header and head (type,
// metadata) are made in the scratch, and its image goes out from where it
// is. (A function of its own, so that appendFrame's stack frame stays
// small: a socket's own goroutines write inline, and an idle socket's
// stacks are most of its memory.)
//
//go:noinline
func (sc *writeScratch) appendPreview(p *comfy.Preview, previewMeta bool) {
	// The head is made first, to size the header; the header then goes
	// before it (one more copy of a few dozen bytes).
	sc.room(maxHeader + previewHead)
	start := len(sc.hdrs)
	if previewMeta && p.Metadata != nil {
		sc.hdrs = p.AppendType4Head(sc.hdrs, *p.Metadata)
	} else {
		sc.hdrs = p.AppendType1Head(sc.hdrs)
	}
	headLen := len(sc.hdrs) - start
	var h [maxHeader]byte
	hdr := appendHeader(h[:0], websocket.BinaryMessage, headLen+len(p.Image))
	sc.hdrs = append(sc.hdrs, hdr...)
	copy(sc.hdrs[start+len(hdr):], sc.hdrs[start:start+headLen])
	copy(sc.hdrs[start:], hdr)
	sc.appendCopy(start)
	sc.appendPayload(p.Image)
}

// appendHeader appends the header of an unmasked, unfragmented server
// frame of opcode op carrying n bytes.
func appendHeader(h []byte, op, n int) []byte {
	h = append(h, 0x80|byte(op))
	switch {
	case n < 126:
		return append(h, byte(n))
	case n <= 0xFFFF:
		return binary.BigEndian.AppendUint16(append(h, 126), uint16(n))
	default:
		return binary.BigEndian.AppendUint64(append(h, 127), uint64(n))
	}
}

// closeFrame is a close frame with a status code and a reason (cut to fit
// a control frame).
func closeFrame(code int, reason string) []byte {
	if len(reason) > 123 {
		reason = reason[:123]
	}
	p := websocket.FormatCloseMessage(code, reason)
	return append(appendHeader(nil, websocket.CloseMessage, len(p)), p...)
}

// pingFrame is an empty ping.
var pingFrame = []byte{0x80 | websocket.PingMessage, 0}

// browserConn is the browser's connection as gorilla sees it after the
// upgrade: what gorilla writes on its own (pongs, close replies, protocol
// errors, each one whole frame in one Write) goes through the socket's
// queue, so that only the socket's writer ever writes to the connection.
type browserConn struct {
	net.Conn
	s        *socket
	upgraded bool
	in       spareReader
}

func (c *browserConn) Read(p []byte) (int, error) { return c.in.read(c.Conn, p) }

func (c *browserConn) Write(p []byte) (int, error) {
	if !c.upgraded {
		return c.Conn.Write(p) // the handshake
	}
	c.s.sendRaw(append([]byte(nil), p...))
	return len(p), nil
}

func (c *browserConn) SetWriteDeadline(t time.Time) error {
	if !c.upgraded {
		return c.Conn.SetWriteDeadline(t)
	}
	return nil // the writer sets its own
}

func (c *browserConn) SetDeadline(t time.Time) error {
	if !c.upgraded {
		return c.Conn.SetDeadline(t)
	}
	return c.Conn.SetReadDeadline(t)
}

// hijacker hands gorilla the connection wrapped in a browserConn.
type hijacker struct {
	http.ResponseWriter
	s    *socket
	conn *browserConn
}

func (h *hijacker) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	hj, ok := h.ResponseWriter.(http.Hijacker)
	if !ok {
		return nil, nil, http.ErrNotSupported
	}
	c, rw, err := hj.Hijack()
	if err != nil {
		return nil, nil, err
	}
	h.conn = &browserConn{Conn: c, s: h.s, in: newSpareReader(c)}
	h.s.out = c
	_, h.s.vectored = c.(*net.TCPConn)
	h.s.raw = h.conn.in.rc // (one RawConn for the socket's reads and writes)
	return h.conn, rw, nil
}
