package relay

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"path"
	"strconv"
	"strings"

	"github.com/comfyume/comfyume/comfy"
	"github.com/comfyume/comfyume/dispatch"
)

// A shared home is one ComfyUI that serves several users of a site (its
// URL has no per-user placeholder). ComfyUI keeps only user data (saved
// workflows, settings) per user, and only with --multi-user and the
// Comfy-User header; everything else on it is everyone's. The gateway
// sends the user's identity as Comfy-User, keeps its own clears and
// interrupts to the user's jobs, and refuses the routes that act on all
// of home's users at once.

// ComfyUserHeader is ComfyUI's multi-user header (app/user_manager.py):
// with --multi-user, it selects whose user data a request reads and
// writes.
const ComfyUserHeader = "Comfy-User"

// ActsOnEveryone reports whether r, passed on to a shared home, would act
// on every user of it at once: /internal/* (the server's logs and its
// input, output and temp folders) and /free (unloads models and frees
// memory under everyone's running job). The path is compared cleaned, so
// "//internal/./logs" is the same route.
func ActsOnEveryone(r *http.Request) bool {
	p := path.Clean("/" + r.URL.Path)
	if strings.HasPrefix(p, "/api/") {
		p = p[4:]
	}
	return p == "/internal" || strings.HasPrefix(p, "/internal/") || p == "/free"
}

// A shared home keeps one socket per sid, the newest: a user who opened a
// socket with someone else's clientId would take theirs over at home (their
// job's events and previews, and their tab cut off from home). So a
// browser's clientId goes to a shared home as a sid of its user's own
// (HomeSID), and the prompts passed on to it carry that sid
// (ownHomePrompt): the same clientId of two users is two sids at home, as
// it is two sessions in the gateway. The sid starts with a tag of its user
// (sharedSIDTag), so that what home lists can be told apart by user.
//
// The sid is a hash, not a secret: home is reached only through the
// gateway, which makes each user's sids from that user's name alone.

// sharedSIDTag is the first half of every sid of user's at a shared home.
func sharedSIDTag(user string) string {
	h := sha256.New()
	writeLP(h, "comfyume shared home user")
	writeLP(h, user)
	return hex.EncodeToString(h.Sum(nil))[:16]
}

// SharedSID is the sid the gateway uses at a shared home for user's
// clientId sid: 32 hex digits (as ComfyUI's own sids), the user's tag
// then a hash of the user and sid.
func SharedSID(user, sid string) string {
	h := sha256.New()
	writeLP(h, "comfyume shared home sid")
	writeLP(h, user)
	writeLP(h, sid)
	return sharedSIDTag(user) + hex.EncodeToString(h.Sum(nil))[:16]
}

// HomeSID is the sid a browser's clientId sid goes to the site's home as:
// the clientId itself on a home of the user's own, the user's own
// SharedSID on a shared home.
func (s Site) HomeSID(sid string) string {
	if !s.SharedHome {
		return sid
	}
	return SharedSID(s.User, sid)
}

// ownsHomeSID reports whether sid, a client_id home lists, is one of
// user's sids at a shared home.
func ownsHomeSID(user, sid string) bool {
	return len(sid) == 32 && strings.HasPrefix(sid, sharedSIDTag(user))
}

// writeLP writes s length-prefixed, so that no two lists of strings hash
// the same bytes.
func writeLP(w io.Writer, s string) {
	var n [8]byte
	binary.BigEndian.PutUint64(n[:], uint64(len(s)))
	_, _ = w.Write(n[:])
	_, _ = io.WriteString(w, s)
}

// ownHomePrompt readies a POST /prompt passed on to a shared home: its
// client_id (or, without one, extra_data's, which ComfyUI reads then) is
// replaced by the user's own sid for it, so home sends the job's events to
// the user's socket and nobody else's. A prompt without any client_id gets
// the sid of the empty clientId: ComfyUI sends the events of a prompt with
// no client (progress, previews) to every socket. On failure it has
// answered already.
func (g *Gateway) ownHomePrompt(w http.ResponseWriter, r *http.Request, site Site) bool {
	// In one of the user's few slots for a prompt body (see promptsAtOnce).
	if !g.prompts.acquire(r.Context(), site.User) {
		return false // the client went away while it waited
	}
	defer g.prompts.release(site.User)
	body, ok := readBody(w, r, site)
	if !ok {
		return false
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(body, &m); err != nil || m == nil {
		writeJSON(w, http.StatusBadRequest, comfy.NewPromptError("invalid_prompt", "Invalid prompt", "The request body is not a JSON object."))
		return false
	}
	sid, found := "", false
	if raw, ok := m["client_id"]; ok {
		found = json.Unmarshal(raw, &sid) == nil
	}
	if raw, ok := m["extra_data"]; ok && !found {
		var extra struct {
			ClientID *string `json:"client_id"`
		}
		if json.Unmarshal(raw, &extra) == nil && extra.ClientID != nil {
			sid = *extra.ClientID
		}
	}
	m["client_id"], _ = json.Marshal(site.HomeSID(sid))
	b, err := json.Marshal(m)
	if err != nil {
		writeJSON(w, http.StatusBadRequest, comfy.NewPromptError("invalid_prompt", "Invalid prompt", err.Error()))
		return false
	}
	r.Body = io.NopCloser(bytes.NewReader(b))
	r.ContentLength = int64(len(b))
	r.Header.Set("Content-Length", strconv.Itoa(len(b)))
	r.TransferEncoding = nil
	r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }
	return true
}

// errNotUsers stands for an answer of a shared home that the gateway
// cannot tell apart by user (home's own /api/jobs list carries no
// client_id): it is not shown.
var errNotUsers = errors.New("relay: a shared home's answer not kept to the user")

// ownHomeAnswer keeps of an answer of a shared home (read from
// pathAndQuery) the jobs of user's: those whose client_id is one of the
// user's sids there. Home's queue and history hold every user's jobs (and
// those sent to home by anyone else, or by the gateway's own link for a
// pool's `fallback home`, which the gateway lists from its own records).
// A job of someone else's asked for by id is not found (404).
func ownHomeAnswer(user, pathAndQuery string, b []byte) ([]byte, error) {
	p, _, _ := strings.Cut(pathAndQuery, "?")
	switch {
	case p == "/queue":
		var q map[string]json.RawMessage
		if err := json.Unmarshal(b, &q); err != nil {
			return nil, err
		}
		for _, k := range []string{"queue_running", "queue_pending"} {
			var items []json.RawMessage
			if raw, ok := q[k]; ok && json.Unmarshal(raw, &items) == nil {
				own := make([]json.RawMessage, 0, len(items))
				for _, it := range items {
					if t, ok := parseQueueTuple(it); ok && ownsHomeSID(user, clientOf(t.extraData)) {
						own = append(own, it)
					}
				}
				q[k], _ = json.Marshal(own)
			}
		}
		return json.Marshal(q)
	case p == "/history" || strings.HasPrefix(p, "/history/"):
		entries, err := decodeOrdered(b)
		if err != nil {
			return nil, err
		}
		var out bytes.Buffer
		out.WriteByte('{')
		for _, e := range entries {
			var h struct {
				Prompt json.RawMessage `json:"prompt"`
			}
			_ = json.Unmarshal(e.val, &h)
			if t, ok := parseQueueTuple(h.Prompt); !ok || !ownsHomeSID(user, clientOf(t.extraData)) {
				continue
			}
			if out.Len() > 1 {
				out.WriteByte(',')
			}
			k, _ := json.Marshal(e.key)
			out.Write(k)
			out.WriteByte(':')
			out.Write(e.val)
		}
		out.WriteByte('}')
		return out.Bytes(), nil
	case p == "/api/jobs":
		return nil, errNotUsers
	case strings.HasPrefix(p, "/api/jobs/"):
		var j struct {
			Workflow struct {
				ExtraData map[string]any `json:"extra_data"`
			} `json:"workflow"`
		}
		if json.Unmarshal(b, &j) != nil || !ownsHomeSID(user, clientOf(j.Workflow.ExtraData)) {
			return nil, &dispatch.HTTPError{Status: http.StatusNotFound, Body: []byte(`{"error":"Job not found"}`)}
		}
		return b, nil
	}
	return b, nil
}

// clientOf is a queued prompt's client_id.
func clientOf(extra map[string]any) string {
	s, _ := extra["client_id"].(string)
	return s
}

// ownHomeIDs keeps of ids, jobs named to act on at home, those that home's
// list at path ("/queue" or "/history") holds for the user: on a shared
// home, the jobs of other users are not the user's to delete or interrupt.
// On a home of the user's own, all of ids.
func (g *Gateway) ownHomeIDs(ctx context.Context, site Site, ids []string, path string) []string {
	if !site.SharedHome || len(ids) == 0 {
		return ids
	}
	running, rest := g.ownHomeJobs(ctx, site, path)
	have := map[string]bool{}
	for _, id := range append(running, rest...) {
		have[id] = true
	}
	own := ids[:0:0]
	for _, id := range ids {
		if have[id] {
			own = append(own, id)
		}
	}
	return own
}

// ownHomeJobs lists the user's jobs in a shared home's list at path: for
// "/queue", those running and those waiting; for "/history", its entries
// (in rest). What a clear or an interrupt without an id does on a shared
// home is done to these, by id.
func (g *Gateway) ownHomeJobs(ctx context.Context, site Site, path string) (running, rest []string) {
	if path == "/queue" {
		var q queueBody
		if g.homeGet(ctx, site, "/queue", &q) == nil {
			for _, raw := range q.Running {
				if t, ok := parseQueueTuple(raw); ok {
					running = append(running, t.id)
				}
			}
			for _, raw := range q.Pending {
				if t, ok := parseQueueTuple(raw); ok {
					rest = append(rest, t.id)
				}
			}
		}
		return running, rest
	}
	var raw json.RawMessage
	if g.homeGet(ctx, site, path, &raw) == nil {
		entries, _ := decodeOrdered(raw)
		for _, e := range entries {
			rest = append(rest, e.key)
		}
	}
	return nil, rest
}

// ownHomeQueued is the user's job id as a shared home's queue lists it
// (nil when it does not, as the user's).
func (g *Gateway) ownHomeQueued(ctx context.Context, site Site, id string) jobView {
	var q queueBody
	if g.homeGet(ctx, site, "/queue", &q) != nil {
		return nil
	}
	for status, items := range map[string][]json.RawMessage{dispatch.StatusInProgress: q.Running, dispatch.StatusPending: q.Pending} {
		for _, raw := range items {
			if t, ok := parseQueueTuple(raw); ok && t.id == id {
				return jobFromQueueItem(raw, status)
			}
		}
	}
	return nil
}

// sharedGate keeps from a user's socket the frames a shared home sends to
// every socket that belong to someone else's job. ComfyUI broadcasts a
// job's display_component and progress text (binary type 3) always, and
// its progress, progress_state, previews and execution_interrupted when
// the prompt has no client_id (one sent to home other than through the
// gateway). Home runs one job at a time, and tells a link's own job's
// start (execution_start, execution_cached, executed, executing a node:
// frames ComfyUI sends to the job's socket only, and again executing on a
// socket that reconnects mid-job) and end (execution_success, _error,
// _interrupted, executing null) on that link, in the order it sends
// everything: those broadcasts pass while the link's own job runs, and
// only then. Every other frame (status, extensions' own messages) passes.
type sharedGate struct{ running bool }

// pass reports whether a frame from a shared home goes on to the socket.
func (g *sharedGate) pass(binary bool, b []byte) bool {
	if binary {
		return g.running
	}
	t, ok := comfy.PeekType(b)
	if !ok {
		return true // onHomeFrame skips what is malformed
	}
	switch t {
	case comfy.MsgExecutionStart, comfy.MsgExecutionCached, comfy.MsgExecuted:
		g.running = true
	case comfy.MsgExecuting:
		h, ok := comfy.ScanEvent(b)
		g.running = ok && h.NodeKind == comfy.NodeString
	case comfy.MsgExecutionSuccess, comfy.MsgExecutionError:
		g.running = false
	case comfy.MsgExecutionInterrupted:
		own := g.running
		g.running = false
		return own
	case comfy.MsgProgress, comfy.MsgProgressState, msgDisplayComponent:
		return g.running
	}
	return true
}

// msgDisplayComponent is ComfyUI's display_component message (API nodes'
// UI, e.g. a chat's history), which it sends to every socket.
const msgDisplayComponent = "display_component"
