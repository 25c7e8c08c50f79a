package relay

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"path"
	"strconv"
	"strings"

	"github.com/comfyume/comfyume/comfy"
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
