package comfytest

import (
	"bytes"
	"net/http"
	"net/url"
	"path"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/google/uuid"
)

// ---- /system_stats, /models ----

func (s *Server) handleSystemStats(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	name := s.opts.Name
	if name == "" {
		name = "cuda:0 comfytest : cudaMallocAsync"
	}
	const vram = 24 << 30
	sys := obj{
		{"os", "posix"},
		{"ram_total", int64(64 << 30)},
		{"ram_free", int64(60 << 30)},
		{"comfyui_version", "unknown"},
	}
	if s.v2026 {
		sys = obj{
			{"os", "linux"},
			{"ram_total", int64(64 << 30)},
			{"ram_free", int64(60 << 30)},
			{"comfyui_version", "0.3.64"},
			{"required_frontend_version", "1.28.7"},
			{"installed_templates_version", "0.1.95"},
			{"required_templates_version", "0.1.95"},
		}
	}
	sys = append(sys,
		kv{"python_version", "3.11.2 (comfytest fake, no Python inside)"},
		kv{"pytorch_version", "2.5.1+cu124"},
		kv{"embedded_python", false},
		kv{"argv", []any{"main.py", "--comfytest", "--version", s.opts.Version}},
	)
	writeJSON(w, 200, obj{
		{"system", sys},
		{"devices", []any{obj{
			{"name", name}, {"type", "cuda"}, {"index", 0},
			{"vram_total", int64(vram)}, {"vram_free", int64(vram - 1<<30)},
			{"torch_vram_total", int64(vram)}, {"torch_vram_free", int64(vram - 1<<30)},
		}}},
	})
}

var modelFolders = []string{"checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
	"style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen", "upscale_models", "custom_nodes",
	"hypernetworks", "photomaker", "classifiers"}

func (s *Server) handleModels(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	out := make([]any, len(modelFolders))
	for i, f := range modelFolders {
		out[i] = f
	}
	writeJSON(w, 200, out)
}

func (s *Server) handleModelsFolder(w http.ResponseWriter, r *http.Request, p map[string]string) {
	if !contains(modelFolders, p["folder"]) {
		emptyResponse(w, 404)
		return
	}
	writeJSON(w, 200, []any{})
}

// ---- /users ----

func (s *Server) handleGetUsers(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	writeJSON(w, 200, obj{{"storage", "server"}, {"migrated", true}})
}

var userNameRe = regexp.MustCompile(`[^a-zA-Z0-9-_]+`)

func (s *Server) handlePostUsers(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	v, ok := s.readJSONBody(w, r)
	if !ok {
		return
	}
	o, _ := v.(obj)
	un, ok := o.get("username")
	if !ok {
		serverError(w)
		return
	}
	name := userNameRe.ReplaceAllString(strings.TrimSpace(pyStr(un)), "-")
	writeJSON(w, 200, name+"_"+uuid.NewString())
}

// ---- /settings (stored in user data as comfy.settings.json) ----

const settingsFile = "comfy.settings.json"

func (s *Server) loadSettingsLocked() obj {
	f := s.userdata[settingsFile]
	if f == nil {
		return obj{}
	}
	v, err := decodeOrdered(f.data)
	if err != nil {
		return obj{}
	}
	o, _ := v.(obj)
	if o == nil {
		o = obj{}
	}
	return o
}

func (s *Server) saveSettingsLocked(o obj) {
	s.userdata[settingsFile] = &memFile{data: mustJSON(o), mod: time.Now()}
}

func (s *Server) handleGetSettings(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	s.umu.Lock()
	o := s.loadSettingsLocked()
	s.umu.Unlock()
	writeJSON(w, 200, o)
}

func (s *Server) handlePostSettings(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	v, ok := s.readJSONBody(w, r)
	if !ok {
		return
	}
	nv, isObj := v.(obj)
	if !isObj {
		serverError(w)
		return
	}
	s.umu.Lock()
	o := s.loadSettingsLocked()
	for _, e := range nv {
		o = o.set(e.K, e.V)
	}
	s.saveSettingsLocked(o)
	s.umu.Unlock()
	emptyResponse(w, 200)
}

func (s *Server) handleGetSetting(w http.ResponseWriter, r *http.Request, p map[string]string) {
	s.umu.Lock()
	v, _ := s.loadSettingsLocked().get(p["id"])
	s.umu.Unlock()
	writeJSON(w, 200, v)
}

func (s *Server) handlePostSetting(w http.ResponseWriter, r *http.Request, p map[string]string) {
	v, ok := s.readJSONBody(w, r)
	if !ok {
		return
	}
	s.umu.Lock()
	s.saveSettingsLocked(s.loadSettingsLocked().set(p["id"], v))
	s.umu.Unlock()
	emptyResponse(w, 200)
}

// ---- /userdata ----

// userPath is get_request_user_filepath: the relative path inside the
// (single, "default") user's directory; ok=false means 403.
func userPath(file string) (string, bool) {
	if strings.Contains(file, "%") {
		if u, err := url.PathUnescape(file); err == nil {
			file = u
		}
	}
	return relInside(file)
}

func (s *Server) userDirExistsLocked(rel string) bool {
	if s.userdirs[rel] {
		return true
	}
	prefix := rel + "/"
	for k := range s.userdata {
		if strings.HasPrefix(k, prefix) {
			return true
		}
	}
	return false
}

func (s *Server) markParentsLocked(rel string) {
	for d := path.Dir(rel); d != "." && d != "/" && d != ""; d = path.Dir(d) {
		s.userdirs[d] = true
	}
}

func (s *Server) fileInfo(rel string, f *memFile, base string) obj {
	p := strings.TrimPrefix(rel, base)
	p = strings.TrimPrefix(p, "/")
	mod := float64(f.mod.UnixNano()) / 1e9
	o := obj{{"path", p}, {"size", len(f.data)}, {"modified", mod}}
	if s.v2026 {
		o = append(o, kv{"created", mod})
	}
	return o
}

func (s *Server) handleListUserdata(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	q := queryOf(r)
	dir := q.Get("dir")
	if dir == "" {
		textResponse(w, 400, "Directory not provided")
		return
	}
	rel, ok := userPath(dir)
	if !ok {
		textResponse(w, 403, "Invalid directory")
		return
	}
	recurse := strings.ToLower(q.Get("recurse")) == "true"
	fullInfo := strings.ToLower(q.Get("full_info")) == "true"
	split := strings.ToLower(q.Get("split")) == "true"
	s.umu.Lock()
	defer s.umu.Unlock()
	if rel != "" && !s.userDirExistsLocked(rel) {
		textResponse(w, 404, "Directory not found")
		return
	}
	prefix := ""
	if rel != "" {
		prefix = rel + "/"
	}
	var keys []string
	for k := range s.userdata {
		rest, ok := strings.CutPrefix(k, prefix)
		if !ok || (!recurse && strings.Contains(rest, "/")) {
			continue
		}
		keys = append(keys, k)
	}
	sort.Strings(keys)
	out := []any{}
	for _, k := range keys {
		rest := strings.TrimPrefix(k, prefix)
		switch {
		case fullInfo:
			out = append(out, s.fileInfo(k, s.userdata[k], rel))
		case split:
			parts := []any{rest}
			for _, p := range strings.Split(rest, "/") {
				parts = append(parts, p)
			}
			out = append(out, parts)
		default:
			out = append(out, rest)
		}
	}
	writeJSON(w, 200, out)
}

func (s *Server) handleGetUserdata(w http.ResponseWriter, r *http.Request, p map[string]string) {
	rel, ok := userPath(p["file"])
	if !ok {
		emptyResponse(w, 403)
		return
	}
	s.umu.Lock()
	f := s.userdata[rel]
	s.umu.Unlock()
	if f == nil {
		emptyResponse(w, 404)
		return
	}
	w.Header().Set("Content-Type", contentTypeFor(rel))
	http.ServeContent(w, r, path.Base(rel), f.mod, bytes.NewReader(f.data))
}

func (s *Server) handlePostUserdata(w http.ResponseWriter, r *http.Request, p map[string]string) {
	rel, ok := userPath(p["file"])
	if !ok || rel == "" {
		emptyResponse(w, 403)
		return
	}
	q := queryOf(r)
	overwrite := true
	if v, ok := q["overwrite"]; ok {
		overwrite = v[0] != "false"
	}
	fullInfo := strings.ToLower(q.Get("full_info")) == "true"
	body, ok := s.readBody(w, r)
	if !ok {
		return
	}
	s.umu.Lock()
	if !overwrite && s.userdata[rel] != nil {
		s.umu.Unlock()
		textResponse(w, 409, "File already exists")
		return
	}
	f := &memFile{data: body, mod: time.Now()}
	s.userdata[rel] = f
	s.markParentsLocked(rel)
	s.umu.Unlock()
	if fullInfo {
		writeJSON(w, 200, s.fileInfo(rel, f, ""))
		return
	}
	writeJSON(w, 200, rel)
}

func (s *Server) handleDeleteUserdata(w http.ResponseWriter, r *http.Request, p map[string]string) {
	rel, ok := userPath(p["file"])
	if !ok {
		emptyResponse(w, 403)
		return
	}
	s.umu.Lock()
	f := s.userdata[rel]
	if f != nil {
		delete(s.userdata, rel)
	}
	s.umu.Unlock()
	if f == nil {
		emptyResponse(w, 404)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) handleMoveUserdata(w http.ResponseWriter, r *http.Request, p map[string]string) {
	src, ok := userPath(p["file"])
	if !ok {
		emptyResponse(w, 403)
		return
	}
	dst, ok := userPath(p["dest"])
	if !ok || dst == "" {
		emptyResponse(w, 403)
		return
	}
	q := queryOf(r)
	overwrite := true
	if v, ok := q["overwrite"]; ok {
		overwrite = v[0] != "false"
	}
	fullInfo := strings.ToLower(q.Get("full_info")) == "true"
	s.umu.Lock()
	f := s.userdata[src]
	if f == nil {
		s.umu.Unlock()
		emptyResponse(w, 404)
		return
	}
	if !overwrite && s.userdata[dst] != nil {
		s.umu.Unlock()
		textResponse(w, 409, "File already exists")
		return
	}
	delete(s.userdata, src)
	s.userdata[dst] = f
	s.markParentsLocked(dst)
	s.umu.Unlock()
	if fullInfo {
		writeJSON(w, 200, s.fileInfo(dst, f, ""))
		return
	}
	writeJSON(w, 200, dst)
}
