package relay

import (
	"bytes"
	"errors"
	"image"
	"image/color"
	"image/draw"
	"image/jpeg"
	"image/png"
	"net/http"
	"strconv"
	"strings"

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
	if transformed, tct, ok := transformImage(b, ct, vr); ok {
		w.Header().Set("Content-Type", tct)
		w.Header().Set("Content-Disposition", `filename="`+vr.Filename+`"`)
		w.Header().Set("Content-Length", strconv.Itoa(len(transformed)))
		w.WriteHeader(http.StatusOK)
		if r.Method != http.MethodHead {
			_, _ = w.Write(transformed)
		}
		return true
	}
	// Like ComfyUI: never let a stored file render as a page of this origin.
	switch {
	case strings.HasPrefix(ct, "text/html"), strings.HasPrefix(ct, "text/javascript"),
		strings.HasPrefix(ct, "application/javascript"), strings.HasPrefix(ct, "text/css"),
		strings.HasPrefix(ct, "application/xhtml"), strings.HasPrefix(ct, "image/svg"):
		ct = "application/octet-stream"
	}
	w.Header().Set("Content-Type", ct)
	w.Header().Set("Content-Disposition", `filename="`+strings.ReplaceAll(vr.Filename, `"`, "")+`"`)
	w.Header().Set("X-Content-Type-Options", "nosniff")
	http.ServeContent(w, r, vr.Filename, info.ModTime, b)
	return true
}

// transformImage applies preview= (JPEG re-encoding; a WebP request gets the
// original file, as Go has no WebP encoder) and channel= (rgb: drop alpha,
// a: alpha as grey PNG). ok is false when the file is served as stored.
func transformImage(b Blob, ct string, vr comfy.ViewRequest) ([]byte, string, bool) {
	wantJPEG := strings.HasPrefix(vr.Preview, "jpeg")
	if !strings.HasPrefix(ct, "image/") || (!wantJPEG && vr.Channel == "rgba") {
		return nil, "", false
	}
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
