package comfy

import (
	"fmt"
	"net/url"
	"path"
	"sort"
	"strings"
	"unicode/utf8"
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

// Limits on the file names users send (in prompts and /view queries).
const (
	// MaxNameLen is the longest file or folder name, in bytes (what
	// common file systems allow).
	MaxNameLen = 255
	// MaxPathLen is the longest subfolder plus file name, in bytes.
	MaxPathLen = 1024
	// MaxPathDepth is the most folders a subfolder may nest.
	MaxPathDepth = 32
)

// PathError says why a file name a user sent is refused.
type PathError struct {
	Value  string
	Reason string
}

func (e *PathError) Error() string {
	return fmt.Sprintf("invalid file path %.300q: %s", e.Value, e.Reason)
}

// CheckName checks one file or folder name: not empty, not "." or "..",
// no slash or backslash, no NUL or control character, valid UTF-8, at most
// MaxNameLen bytes.
func CheckName(name string) error {
	switch {
	case name == "":
		return &PathError{name, "empty name"}
	case name == "." || name == "..":
		return &PathError{name, "relative name"}
	case len(name) > MaxNameLen:
		return &PathError{name, "name too long"}
	case !utf8.ValidString(name):
		return &PathError{name, "not UTF-8"}
	}
	for _, c := range name {
		if c == '/' || c == '\\' {
			return &PathError{name, "separator in name"}
		}
		if c < 0x20 || c == 0x7f {
			return &PathError{name, "control character"}
		}
	}
	return nil
}

// CheckSubfolder checks a relative folder path ("" for none): names
// separated by single slashes, each one valid for CheckName, at most
// MaxPathDepth deep and MaxPathLen long. There is nothing to clean in a
// valid subfolder: every spelling of a folder but one is refused.
func CheckSubfolder(sub string) error {
	if sub == "" {
		return nil
	}
	if len(sub) > MaxPathLen {
		return &PathError{sub, "path too long"}
	}
	depth := 0
	for rest := sub; ; {
		name, more, found := strings.Cut(rest, "/")
		if err := CheckName(name); err != nil {
			return &PathError{sub, err.(*PathError).Reason}
		}
		if depth++; depth > MaxPathDepth {
			return &PathError{sub, "too deep"}
		}
		if !found {
			return nil
		}
		rest = more
	}
}

// Check reports whether the ref is one the gateway may use as it is: a
// known type, a valid file name (CheckName), a valid subfolder
// (CheckSubfolder), MaxPathLen at most in all. Every ref a user or an
// upstream sends passes here before it names a file or a key.
func (r FileRef) Check() error {
	if !ValidType(r.Type) {
		return &PathError{r.Type, "unknown type"}
	}
	if err := CheckName(r.Filename); err != nil {
		return err
	}
	if err := CheckSubfolder(r.Subfolder); err != nil {
		return err
	}
	if len(r.Subfolder)+1+len(r.Filename) > MaxPathLen {
		return &PathError{r.Subfolder + "/" + r.Filename, "path too long"}
	}
	return nil
}

// ParseAnnotated splits an input value such as "sub/dir/name.png [output]"
// into a reference. Without an annotation the type is defaultType. Values
// that do not name a file inside its directory in exactly one way (see
// FileRef.Check: "..", ".", empty names, backslashes, absolute paths, NUL
// and other control characters, overlong names) are refused.
func ParseAnnotated(value, defaultType string) (FileRef, error) {
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
	if len(v) > MaxPathLen {
		return FileRef{}, &PathError{value, "path too long"}
	}
	dir, file := path.Split(v)
	r := FileRef{Filename: file, Subfolder: strings.TrimSuffix(dir, "/"), Type: typ}
	if strings.HasPrefix(v, "/") {
		return FileRef{}, &PathError{value, "absolute path"}
	}
	if err := r.Check(); err != nil {
		return FileRef{}, &PathError{value, err.(*PathError).Reason}
	}
	return r, nil
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

// ParseView checks a /view query with ComfyUI's rules, and the gateway's
// own (FileRef.Check). A non-zero status is what ComfyUI answers: 404
// without filename, 400 for an unknown type, a filename that starts with
// "/" or contains "..", 403 for a subfolder that escapes its directory. A
// subfolder ComfyUI would clean first (".", "..", empty names) or any
// other name Check refuses is a 400 as well: there is one spelling of
// each file.
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
		if clean := path.Clean(sub); clean == ".." || strings.HasPrefix(clean, "../") {
			return v, 403
		}
		v.Subfolder = sub
	}
	if v.FileRef.Check() != nil {
		return v, 400
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
