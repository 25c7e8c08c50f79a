package comfytest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"image"
	"io"
	"mime"
	"net/http"
	"path"
	"sort"
	"strconv"
	"strings"
	"time"
)

// memFile is a file of the in-memory input/output/temp/user directories.
type memFile struct {
	data []byte
	mod  time.Time
}

func validType(t string) bool { return t == "input" || t == "output" || t == "temp" }

// fileKey is the store key "typ/rel/path" of subfolder/name under typ; ok is
// false if the path leaves the directory.
func fileKey(typ, subfolder, name string) (string, bool) {
	if !validType(typ) || name == "" {
		return "", false
	}
	rel, ok := relInside(path.Join(subfolder, name))
	if !ok || rel == "" {
		return "", false
	}
	return typ + "/" + rel, true
}

// relInside cleans a relative path and reports whether it stays inside its
// root ("" is the root itself).
func relInside(p string) (string, bool) {
	if strings.HasPrefix(p, "/") {
		return "", false
	}
	c := path.Clean(p)
	if c == "." {
		return "", true
	}
	if c == ".." || strings.HasPrefix(c, "../") {
		return "", false
	}
	return c, true
}

// joinSubfolder is os.path.join(root, sub) + the commonpath check of
// /view: an absolute sub replaces the root.
func joinSubfolder(sub string) (string, bool) {
	const root = "/comfytest-root"
	joined := root + "/" + sub
	if strings.HasPrefix(sub, "/") {
		joined = sub
	}
	c := path.Clean(joined)
	if c == root {
		return "", true
	}
	if !strings.HasPrefix(c, root+"/") {
		return "", false
	}
	return strings.TrimPrefix(c, root+"/"), true
}

func (s *Server) getFile(key string) *memFile {
	s.fmu.Lock()
	defer s.fmu.Unlock()
	return s.files[key]
}

func (s *Server) putFile(key string, data []byte) {
	s.fmu.Lock()
	s.files[key] = &memFile{data: data, mod: time.Now()}
	s.fmu.Unlock()
}

// listDir returns the names of the files directly inside typ/sub.
func (s *Server) listDir(typ, sub string) []string {
	prefix := typ + "/"
	if sub != "" {
		prefix += sub + "/"
	}
	s.fmu.Lock()
	defer s.fmu.Unlock()
	var names []string
	for k := range s.files {
		if rest, ok := strings.CutPrefix(k, prefix); ok && !strings.Contains(rest, "/") {
			names = append(names, rest)
		}
	}
	sort.Strings(names)
	return names
}

// nextCounter is folder_paths.get_save_image_path's counter.
func (s *Server) nextCounter(typ, sub, filename string) int {
	counter := 0
	n := len(filename)
	for _, f := range s.listDir(typ, sub) {
		if len(f) < n+1 {
			continue
		}
		prefix := f[:n+1]
		digits, err := strconv.Atoi(strings.SplitN(f[n+1:], "_", 2)[0])
		if err != nil {
			digits = 0
		}
		if prefix[:n] == filename && prefix[n] == '_' && digits > counter {
			counter = digits
		}
	}
	return counter + 1
}

var imageExts = map[string]bool{".png": true, ".jpg": true, ".jpeg": true, ".webp": true, ".gif": true, ".bmp": true, ".tif": true, ".tiff": true}

// inputImageList is LoadImage's COMBO: files directly in the input dir.
func (s *Server) inputImageList() []string {
	names := s.listDir("input", "")
	if !s.v2026 {
		return names
	}
	var out []string
	for _, n := range names {
		if imageExts[strings.ToLower(path.Ext(n))] {
			out = append(out, n)
		}
	}
	return out
}

// splitAnnotation is folder_paths.annotated_filepath.
func splitAnnotation(name string) (string, string) {
	for _, a := range []string{"output", "input", "temp"} {
		if strings.HasSuffix(name, "["+a+"]") {
			cut := min(len(a)+3, len(name))
			return name[:len(name)-cut], a
		}
	}
	return name, ""
}

var contentTypes = map[string]string{
	".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".gif": "image/gif",
	".bmp": "image/bmp", ".svg": "image/svg+xml", ".tif": "image/tiff", ".tiff": "image/tiff",
	".mp4": "video/mp4", ".webm": "video/webm", ".mov": "video/quicktime", ".mkv": "video/x-matroska",
	".mp3": "audio/mpeg", ".wav": "audio/x-wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".m4a": "audio/mp4",
	".json": "application/json", ".txt": "text/plain", ".glb": "model/gltf-binary", ".gltf": "model/gltf+json",
	".obj": "model/obj", ".pdf": "application/pdf", ".zip": "application/zip",
}

// contentTypeFor is mimetypes.guess_type plus ComfyUI's forced downloads.
func contentTypeFor(name string) string {
	ext := strings.ToLower(path.Ext(name))
	switch ext {
	case ".html", ".htm", ".xhtml", ".js", ".mjs", ".css":
		return "application/octet-stream"
	}
	if ct, ok := contentTypes[ext]; ok {
		return ct
	}
	if ct := mime.TypeByExtension(ext); ct != "" {
		if i := strings.Index(ct, ";"); i >= 0 {
			ct = ct[:i]
		}
		return ct
	}
	return "application/octet-stream"
}

func (s *Server) handleView(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	q := queryOf(r)
	fv, ok := q["filename"]
	if !ok {
		emptyResponse(w, 404)
		return
	}
	name, dir := splitAnnotation(fv[0])
	if name == "" || name[0] == '/' || strings.Contains(name, "..") {
		emptyResponse(w, 400)
		return
	}
	if dir == "" {
		dir = "output"
		if tv, ok := q["type"]; ok {
			dir = tv[0]
		}
		if !validType(dir) {
			emptyResponse(w, 400)
			return
		}
	}
	sub := ""
	if sv, ok := q["subfolder"]; ok {
		rel, ok := joinSubfolder(sv[0])
		if !ok {
			emptyResponse(w, 403)
			return
		}
		sub = rel
	}
	base := path.Base(name)
	if strings.HasSuffix(name, "/") {
		base = ""
	}
	key, ok := fileKey(dir, sub, base)
	var f *memFile
	if ok {
		f = s.getFile(key)
	}
	if f == nil {
		emptyResponse(w, 404)
		return
	}
	disp := fmt.Sprintf("filename=\"%s\"", base)
	channel := q.Get("channel")
	if pv, ok := q["preview"]; ok {
		parts := strings.Split(pv[0], ";")
		quality := 90
		if qn, err := strconv.Atoi(parts[len(parts)-1]); err == nil && qn >= 0 {
			quality = min(max(qn, 1), 100)
		}
		img, err := decodeAny(f.data)
		if err != nil {
			serverError(w)
			return
		}
		rgb, _ := splitAlpha(img)
		// ComfyUI answers webp for "webp;.." and for alpha requests; Go has
		// no WebP encoder, so every preview is a JPEG.
		data, err := encodeJPEG(rgb, quality)
		if err != nil {
			serverError(w)
			return
		}
		w.Header().Set("Content-Type", "image/jpeg")
		w.Header().Set("Content-Disposition", disp)
		_, _ = w.Write(data)
		return
	}
	switch channel {
	case "rgb", "a":
		img, err := decodeAny(f.data)
		if err != nil {
			serverError(w)
			return
		}
		rgb, alpha := splitAlpha(img)
		var out image.Image = rgb
		if channel == "a" {
			a := image.NewNRGBA(rgb.Rect)
			for i := 3; i < len(a.Pix); i += 4 {
				if alpha != nil {
					a.Pix[i] = alpha.Pix[i/4]
				} else {
					a.Pix[i] = 255
				}
			}
			out = a
		}
		data, err := encodePNG(out)
		if err != nil {
			serverError(w)
			return
		}
		w.Header().Set("Content-Type", "image/png")
		w.Header().Set("Content-Disposition", disp)
		_, _ = w.Write(data)
		return
	}
	w.Header().Set("Content-Type", contentTypeFor(base))
	w.Header().Set("Content-Disposition", disp)
	http.ServeContent(w, r, base, f.mod, bytes.NewReader(f.data))
}

// ---- uploads ----

type uploadForm struct {
	fields   map[string]string
	file     []byte
	filename string
	hasFile  bool
}

// readUploadForm reads a multipart form fully into memory.
func (s *Server) readUploadForm(w http.ResponseWriter, r *http.Request) (*uploadForm, bool) {
	f := &uploadForm{fields: map[string]string{}}
	mr, err := r.MultipartReader()
	if err != nil {
		// aiohttp's post() of a non-multipart body has no "image" → 400.
		if _, ok := s.readBody(w, r); !ok {
			return nil, false
		}
		return f, true
	}
	for {
		p, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			var mbe *http.MaxBytesError
			if errors.As(err, &mbe) {
				tooLarge(w, s.maxBody, s.maxBody+1)
				return nil, false
			}
			emptyResponse(w, 400)
			return nil, false
		}
		data, err := io.ReadAll(p)
		if err != nil {
			var mbe *http.MaxBytesError
			if errors.As(err, &mbe) {
				tooLarge(w, s.maxBody, s.maxBody+1)
				return nil, false
			}
			emptyResponse(w, 400)
			return nil, false
		}
		name := p.FormName()
		if name == "image" && !f.hasFile && p.FileName() != "" {
			f.hasFile, f.file, f.filename = true, data, p.FileName()
			continue
		}
		if _, seen := f.fields[name]; !seen && p.FileName() == "" {
			f.fields[name] = string(data)
		}
	}
	return f, true
}

// pySplitExt is os.path.splitext.
func pySplitExt(name string) (string, string) {
	base := path.Base(name)
	trimmed := strings.TrimLeft(base, ".")
	ext := path.Ext(trimmed)
	if ext == "" {
		return name, ""
	}
	return name[:len(name)-len(ext)], ext
}

func (s *Server) handleUploadImage(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	s.upload(w, r, false)
}

func (s *Server) handleUploadMask(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	s.upload(w, r, true)
}

func (s *Server) upload(w http.ResponseWriter, r *http.Request, mask bool) {
	form, ok := s.readUploadForm(w, r)
	if !ok {
		return
	}
	typ, hasType := form.fields["type"]
	if !hasType {
		typ = "input"
	}
	if !validType(typ) {
		serverError(w) // UnboundLocalError in get_dir_by_type
		return
	}
	if !form.hasFile {
		emptyResponse(w, 400)
		return
	}
	filename := form.filename
	subfolder := form.fields["subfolder"]
	normSub, ok := relInside(subfolder) // rejects absolute and escaping paths
	if !ok {
		emptyResponse(w, 400)
		return
	}
	key, ok := fileKey(typ, normSub, filename)
	if !ok {
		emptyResponse(w, 400)
		return
	}
	overwrite := form.fields["overwrite"]
	duplicate := false
	if overwrite != "true" && overwrite != "1" {
		stem, ext := pySplitExt(filename)
		for i := 1; ; i++ {
			existing := s.getFile(key)
			if existing == nil {
				break
			}
			if bytes.Equal(sha256sum(existing.data), sha256sum(form.file)) {
				duplicate = true
				break
			}
			filename = fmt.Sprintf("%s (%d)%s", stem, i, ext)
			key, _ = fileKey(typ, normSub, filename)
		}
	}
	if !duplicate {
		data := form.file
		if mask {
			if composed, ok := s.composeMask(form.fields["original_ref"], form.file); ok {
				data = composed
			}
		}
		s.putFile(key, append([]byte(nil), data...))
	}
	s.rmu.Lock()
	s.uploads = append(s.uploads, Upload{Name: filename, Subfolder: subfolder, Type: typ, Data: append([]byte(nil), form.file...), Header: r.Header.Clone()})
	s.rmu.Unlock()
	s.logf("upload %s/%s (%s, %d bytes, duplicate=%v)", subfolder, filename, typ, len(form.file), duplicate)
	writeJSON(w, 200, obj{{"name", filename}, {"subfolder", subfolder}, {"type", typ}})
}

// composeMask copies the original image referenced by original_ref and
// replaces its alpha channel with the mask's alpha, like ComfyUI.
func (s *Server) composeMask(ref string, maskData []byte) ([]byte, bool) {
	var o struct {
		Filename  string `json:"filename"`
		Subfolder string `json:"subfolder"`
		Type      string `json:"type"`
	}
	if json.Unmarshal([]byte(ref), &o) != nil {
		return nil, false
	}
	name, dir := splitAnnotation(o.Filename)
	if name == "" || name[0] == '/' || strings.Contains(name, "..") {
		return nil, false
	}
	if dir == "" {
		dir = o.Type
		if dir == "" {
			dir = "output"
		}
	}
	sub, ok := joinSubfolder(o.Subfolder)
	if !ok {
		return nil, false
	}
	key, ok := fileKey(dir, sub, name)
	if !ok {
		return nil, false
	}
	f := s.getFile(key)
	if f == nil {
		return nil, false
	}
	orig, err := decodeAny(f.data)
	if err != nil {
		return nil, false
	}
	m, err := decodeAny(maskData)
	if err != nil {
		return nil, false
	}
	rgb, _ := splitAlpha(orig)
	_, malpha := splitAlpha(m)
	mb := m.Bounds()
	for y := 0; y < rgb.Rect.Dy(); y++ {
		for x := 0; x < rgb.Rect.Dx(); x++ {
			a := uint8(255)
			if malpha != nil && x < mb.Dx() && y < mb.Dy() {
				a = malpha.Pix[malpha.PixOffset(x, y)]
			}
			rgb.Pix[rgb.PixOffset(x, y)+3] = a
		}
	}
	data, err := encodePNG(rgb)
	if err != nil {
		return nil, false
	}
	var texts []kv
	for k, v := range pngTextChunks(f.data) {
		texts = append(texts, kv{k, v})
	}
	sort.Slice(texts, func(a, b int) bool { return texts[a].K < texts[b].K })
	return pngWithText(data, texts), true
}
