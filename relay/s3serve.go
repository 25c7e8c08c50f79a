package relay

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"time"

	"go.uber.org/zap"

	"github.com/comfyume/comfyume/comfy"
)

// Presigner is implemented by blob stores whose files a browser can fetch
// directly (S3Blobs, and Spool over one). With Config.RedirectExpiry set,
// /view answers 302 to such a URL instead of streaming the file through
// Caddy.
type Presigner interface {
	// PresignGet returns a URL serving key for expiry with
	// Content-Disposition naming filename, or ErrPresignUnavailable when
	// this file must be served by the gateway.
	PresignGet(ctx context.Context, key, filename string, expiry time.Duration) (*url.URL, error)
}

// ErrPresignUnavailable is returned by PresignGet for a file the browser
// cannot fetch directly (e.g. one still in the spool); /view then serves it
// itself.
var ErrPresignUnavailable = errors.New("relay: no presigned URL for this blob")

// redirectView answers a /view request, already checked for ownership,
// with a redirect to a presigned URL. It returns false when the gateway
// serves the file itself: redirect mode is off, the store cannot presign,
// the request asks for a transformation (preview=, channel=), or the file
// is of a type /view neutralises.
func (g *Gateway) redirectView(w http.ResponseWriter, r *http.Request, key string, vr comfy.ViewRequest) bool {
	p, ok := g.blobs.(Presigner)
	// GET only: a presigned URL is bound to its method (a HEAD would fail).
	if !ok || g.cfg.RedirectExpiry <= 0 || r.Method != http.MethodGet || vr.Preview != "" || (vr.Channel != "" && vr.Channel != "rgba") ||
		!servedInline(contentTypeOf(vr.Filename)) {
		return false
	}
	u, err := p.PresignGet(r.Context(), key, vr.Filename, g.cfg.RedirectExpiry)
	if err != nil {
		if !errors.Is(err, ErrPresignUnavailable) {
			g.logger.Warn("presigning output; serving it instead", zap.String("key", key), zap.Error(err))
		}
		return false
	}
	w.Header().Set("Location", u.String())
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusFound)
	return true
}
