package relay

import (
	"bytes"
	"context"
	"errors"
	"image"
	"image/color"
	"image/draw"
	"image/jpeg"
	"image/png"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"

	_ "image/gif" // decoders for preview= and channel=

	"go.uber.org/zap"

	"github.com/comfyume/comfyume/comfy"
)

// serveView serves captured outputs on /view. Refs outside the gateway's
// subfolder are left to the next handler (the user's home); it returns
// false for those.
func (g *Gateway) serveView(w http.ResponseWriter, r *http.Request, site Site) bool {
	q := comfy.ParseQuery(r.URL.RawQuery)
	sub := strings.TrimLeft(q.Get("subfolder"), "/")
	if sub != OutputsSubfolder && !strings.HasPrefix(sub, OutputsSubfolder+"/") {
		return false
	}
	vr, status := comfy.ParseView(q)
	if status != 0 {
		w.WriteHeader(status)
		return true
	}
	key, jobID, ok := blobKey(vr.FileRef)
	if !ok {
		w.WriteHeader(http.StatusNotFound)
		return true
	}
	// Only the owner sees a job's outputs; anyone else gets the same 404 as
	// for a file that does not exist.
	if j := g.userJob(r.Context(), site.User, jobID, false); j == nil {
		w.WriteHeader(http.StatusNotFound)
		return true
	}
	// Redirect mode (Config.RedirectExpiry): 302 to a presigned URL.
	if g.redirectView(w, r, key, vr) {
		return true
	}
	b, err := g.blobs.Open(r.Context(), key)
	if err != nil {
		if !errors.Is(err, ErrBlobNotFound) {
			g.logger.Error("opening output", zap.String("key", key), zap.Error(err))
			w.WriteHeader(http.StatusInternalServerError)
			return true
		}
		w.WriteHeader(http.StatusNotFound)
		return true
	}
	defer b.Close()
	info := b.Info()
	ct := info.ContentType
	if ct == "" {
		ct = contentTypeOf(vr.Filename)
	}
	if transformed, tct, ok := transformImage(r.Context(), b, ct, vr); ok {
		w.Header().Set("Content-Type", tct)
		w.Header().Set("Content-Disposition", disposition("inline", vr.Filename))
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Header().Set("Content-Length", strconv.Itoa(len(transformed)))
		w.WriteHeader(http.StatusOK)
		if r.Method != http.MethodHead {
			_, _ = w.Write(transformed)
		}
		return true
	}
	// Only the media ComfyUI makes are shown in the browser; anything else
	// (HTML, SVG, scripts...) is a download, never a page of this origin.
	if servedInline(ct) {
		w.Header().Set("Content-Disposition", disposition("inline", vr.Filename))
	} else {
		ct = "application/octet-stream"
		w.Header().Set("Content-Disposition", disposition("attachment", vr.Filename))
	}
	w.Header().Set("Content-Type", ct)
	w.Header().Set("X-Content-Type-Options", "nosniff")
	if rg := r.Header.Get("Range"); strings.Count(rg, ",") >= maxRanges {
		// Each range is a read of its own (with S3, a request to the
		// bucket): a request of more is answered with the whole file, as
		// RFC 9110 lets a server ignore Range.
		r.Header.Del("Range")
	}
	http.ServeContent(w, r, vr.Filename, info.ModTime, b)
	return true
}

// maxRanges is the most byte ranges one /view request is answered with
// (browsers and players ask for one).
const maxRanges = 16

// servedInline reports whether a stored output of this content type is
// shown by the browser: images (not SVG, which runs scripts), video, audio,
// 3D models, and plain text or JSON.
func servedInline(ct string) bool {
	mt, _, err := mime.ParseMediaType(ct)
	if err != nil {
		return false
	}
	switch {
	case mt == "image/svg+xml":
		return false
	case strings.HasPrefix(mt, "image/"), strings.HasPrefix(mt, "video/"), strings.HasPrefix(mt, "audio/"):
		return true
	}
	switch mt {
	case "model/gltf-binary", "model/gltf+json", "model/obj", "model/stl", "model/vnd.usdz+zip",
		"text/plain", "application/json":
		return true
	}
	return false
}

// disposition is a Content-Disposition header naming the file (quoted or
// RFC 2231-encoded as needed).
func disposition(kind, filename string) string {
	if v := mime.FormatMediaType(kind, map[string]string{"filename": filename}); v != "" {
		return v
	}
	return kind
}

// Bounds of preview= and channel= transforms, which decode the whole image
// in memory (4 bytes or more per pixel).
const (
	// maxTransformPixels is the largest image transformed; a bigger one is
	// served as stored.
	maxTransformPixels = 16 << 20
	// transformSlots is how many transforms run at once; maxTransformWaits
	// more may wait for a slot, beyond that the file is served as stored.
	transformSlots    = 2
	maxTransformWaits = 8
)

var (
	transforms       = make(chan struct{}, transformSlots)
	transformWaiting atomic.Int64
)

// transformSlot waits for a transform slot; ok is false (serve the file as
// stored) when too many wait already or ctx ends.
func transformSlot(ctx context.Context) (release func(), ok bool) {
	select {
	case transforms <- struct{}{}:
		return func() { <-transforms }, true
	default:
	}
	if transformWaiting.Add(1) > maxTransformWaits {
		transformWaiting.Add(-1)
		return nil, false
	}
	defer transformWaiting.Add(-1)
	select {
	case transforms <- struct{}{}:
		return func() { <-transforms }, true
	case <-ctx.Done():
		return nil, false
	}
}

// transformImage applies preview= (JPEG re-encoding; a WebP request gets the
// original file, as Go has no WebP encoder) and channel= (rgb: drop alpha,
// a: alpha as grey PNG). ok is false when the file is served as stored.
//
// Only images up to maxTransformPixels are transformed, transformSlots at
// a time; others are served as stored.
func transformImage(ctx context.Context, b Blob, ct string, vr comfy.ViewRequest) ([]byte, string, bool) {
	wantJPEG := strings.HasPrefix(vr.Preview, "jpeg")
	if !strings.HasPrefix(ct, "image/") || (!wantJPEG && vr.Channel != "rgb" && vr.Channel != "a") {
		return nil, "", false
	}
	cfg, _, err := image.DecodeConfig(b)
	if _, serr := b.Seek(0, 0); err != nil || serr != nil {
		return nil, "", false
	}
	if cfg.Width <= 0 || cfg.Height <= 0 || int64(cfg.Width)*int64(cfg.Height) > maxTransformPixels {
		return nil, "", false
	}
	release, ok := transformSlot(ctx)
	if !ok {
		return nil, "", false
	}
	defer release()
	img, _, err := image.Decode(b)
	if _, serr := b.Seek(0, 0); err != nil || serr != nil {
		return nil, "", false
	}
	var buf bytes.Buffer
	switch {
	case wantJPEG:
		quality := 90
		if _, qs, ok := strings.Cut(vr.Preview, ";"); ok {
			if n, err := strconv.Atoi(qs); err == nil && n > 0 && n <= 100 {
				quality = n
			}
		}
		if jpeg.Encode(&buf, img, &jpeg.Options{Quality: quality}) != nil {
			return nil, "", false
		}
		return buf.Bytes(), "image/jpeg", true
	case vr.Channel == "rgb":
		rgb := image.NewRGBA(img.Bounds())
		draw.Draw(rgb, rgb.Bounds(), image.NewUniform(color.Black), image.Point{}, draw.Src)
		draw.Draw(rgb, rgb.Bounds(), img, img.Bounds().Min, draw.Over)
		if png.Encode(&buf, rgb) != nil {
			return nil, "", false
		}
		return buf.Bytes(), "image/png", true
	case vr.Channel == "a":
		bounds := img.Bounds()
		alpha := image.NewGray(bounds)
		for y := bounds.Min.Y; y < bounds.Max.Y; y++ {
			for x := bounds.Min.X; x < bounds.Max.X; x++ {
				_, _, _, a := img.At(x, y).RGBA()
				alpha.SetGray(x, y, color.Gray{Y: uint8(a >> 8)})
			}
		}
		if png.Encode(&buf, alpha) != nil {
			return nil, "", false
		}
		return buf.Bytes(), "image/png", true
	}
	return nil, "", false
}
