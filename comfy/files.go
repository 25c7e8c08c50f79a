package comfy

import (
	"net/url"
	"path"
	"sort"
	"strings"
)

// File types ComfyUI knows: the directory a file lives in.
const (
	TypeOutput = "output"
	TypeInput  = "input"
	TypeTemp   = "temp"
)

// FileRef names a file on a ComfyUI server the way its /view does.
type FileRef struct {
	Filename  string `json:"filename"`
	Subfolder string `json:"subfolder"`
	Type      string `json:"type"`
}

// ValidType reports whether t is a type /view accepts.
func ValidType(t string) bool {
	return t == TypeOutput || t == TypeInput || t == TypeTemp
}

// ParseAnnotated splits an input value such as "sub/dir/name.png [output]"
// into a reference. Without an annotation the type is defaultType.
func ParseAnnotated(value, defaultType string) FileRef {
	typ := defaultType
	v := strings.TrimSpace(value)
	for _, t := range []string{TypeOutput, TypeInput, TypeTemp} {
		suffix := " [" + t + "]"
		if strings.HasSuffix(v, suffix) {
			typ = t
			v = strings.TrimSuffix(v, suffix)
			break
		}
	}
	dir, file := path.Split(v)
	return FileRef{Filename: file, Subfolder: strings.TrimSuffix(dir, "/"), Type: typ}
}

// Annotated is the inverse of ParseAnnotated: "sub/name.png [type]", with the
// annotation omitted when the type is input.
func (r FileRef) Annotated() string {
	v := r.Filename
	if r.Subfolder != "" {
		v = r.Subfolder + "/" + v
	}
	if r.Type != "" && r.Type != TypeInput {
		v += " [" + r.Type + "]"
	}
	return v
}

// Query returns the /view query string for the ref.
func (r FileRef) Query() string {
	q := url.Values{}
	q.Set("filename", r.Filename)
	q.Set("subfolder", r.Subfolder)
	q.Set("type", r.Type)
	return q.Encode()
}

// ViewRequest is a checked GET /view query.
type ViewRequest struct {
	FileRef
	// Preview is the preview= parameter, e.g. "webp;90" ("" for none).
	Preview string
	// Channel is "rgba" (default), "rgb" or "a".
	Channel string
}

// ParseView checks a /view query with ComfyUI's rules. A non-zero status is
// what ComfyUI answers: 404 without filename, 400 for an unknown type, a
// filename that starts with "/" or contains "..", 403 for a subfolder that
// escapes its directory.
func ParseView(q url.Values) (ViewRequest, int) {
	var v ViewRequest
	name, ok := q["filename"]
	if !ok || len(name) == 0 || name[0] == "" {
		return v, 404
	}
	v.Filename = name[0]
	v.Type = q.Get("type")
	if v.Type == "" {
		v.Type = TypeOutput
	}
	for _, t := range []string{TypeOutput, TypeInput, TypeTemp} {
		suffix := " [" + t + "]"
		if strings.HasSuffix(v.Filename, suffix) {
			v.Filename = strings.TrimSuffix(v.Filename, suffix)
			v.Type = t
			break
		}
	}
	if !ValidType(v.Type) {
		return v, 400
	}
	if strings.HasPrefix(v.Filename, "/") || strings.Contains(v.Filename, "..") {
		return v, 400
	}
	v.Filename = path.Base(v.Filename)
	if sub := q.Get("subfolder"); sub != "" {
		if strings.HasPrefix(sub, "/") || strings.ContainsRune(sub, 0) {
			return v, 403
		}
		clean := path.Clean(sub)
		if clean == ".." || strings.HasPrefix(clean, "../") {
			return v, 403
		}
		if clean != "." {
			v.Subfolder = clean
		}
	}
	v.Preview = q.Get("preview")
	v.Channel = q.Get("channel")
	if v.Channel == "" {
		v.Channel = "rgba"
	}
	return v, 0
}

// RefsIn walks a UI output dict ({"images": [{filename, subfolder, type}],
// "gifs": [...], "audio": [...], ...}) and calls fn for every file reference,
// whatever its media key, keys in sorted order and each list in its own.
// fn may change the ref's fields in place (the map is the item itself).
// Items without a string filename are skipped.
func RefsIn(output map[string]any, fn func(key string, item map[string]any)) {
	keys := make([]string, 0, len(output))
	for k := range output {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, key := range keys {
		list, ok := output[key].([]any)
		if !ok {
			continue
		}
		for _, it := range list {
			item, ok := it.(map[string]any)
			if !ok {
				continue
			}
			if _, ok := item["filename"].(string); !ok {
				continue
			}
			fn(key, item)
		}
	}
}

// RefOf reads the FileRef fields of an output item (type defaults to output).
func RefOf(item map[string]any) FileRef {
	r := FileRef{}
	r.Filename, _ = item["filename"].(string)
	r.Subfolder, _ = item["subfolder"].(string)
	r.Type, _ = item["type"].(string)
	if r.Type == "" {
		r.Type = TypeOutput
	}
	return r
}

// ParseQuery reads a query string the way ComfyUI's server (aiohttp) does:
// pairs are split on "&" only, so a value such as "webp;90" (the frontend's
// preview= parameter, sent unescaped) survives. Go's url.ParseQuery drops
// any pair that contains a ";".
func ParseQuery(raw string) url.Values {
	v := url.Values{}
	for _, pair := range strings.Split(raw, "&") {
		if pair == "" {
			continue
		}
		k, val, _ := strings.Cut(pair, "=")
		if uk, err := url.QueryUnescape(k); err == nil {
			k = uk
		}
		if uv, err := url.QueryUnescape(val); err == nil {
			val = uv
		}
		v[k] = append(v[k], val)
	}
	return v
}
