package comfy

import (
	"encoding/binary"
	"encoding/json"
	"math/bits"
	"sort"
	"unicode/utf16"
	"unicode/utf8"
)

// A prompt body carries the UI workflow in extra_data — often megabytes of
// JSON the gateway never interprets — and a GPU server sends thousands of
// JSON events per job. Both are read here, from their bytes, without
// decoding the values into Go: one set of validating primitives checks
// JSON as json.Valid would while finding where each value ends, so that a
// body or a frame is scanned once and relayed byte for byte.

// Member is one key of a JSON object with its value as sent.
type Member struct {
	Key   string
	Value json.RawMessage
}

// ObjectMembers splits a JSON object into its members, in order, without
// copying or decoding the values. ok is false when b does not start with
// a valid object.
func ObjectMembers(b []byte) (members []Member, ok bool) {
	end := walkObject(b, skipSpace(b, 0), 0, func(key []byte, at int) int {
		e := validValue(b, at, 1)
		if e >= 0 {
			members = append(members, Member{unquote(key), b[at:e:e]})
		}
		return e
	})
	return members, end >= 0
}

// ObjectMember returns the value of a key of a JSON object (its first
// occurrence), scanning no further than needed: for the frontend's
// workflow, whose "id" comes first, that is a few bytes of megabytes. b
// must be valid JSON.
func ObjectMember(b []byte, key string) (json.RawMessage, bool) {
	var found json.RawMessage
	walkObject(b, skipSpace(b, 0), 0, func(k []byte, at int) int {
		e := validValue(b, at, 1)
		if e >= 0 && keyIs(k, key) {
			found = b[at:e:e]
			return stop
		}
		return e
	})
	return found, found != nil
}

// ValueFrom returns b from the start of the value of key (its first
// occurrence in the object b) to the end of b, without finding where that
// value ends: for the value's own first members (the frontend's workflow
// "id") read a few bytes of a megabyte. Values before key are skipped. b
// must be valid JSON.
func ValueFrom(b []byte, key string) ([]byte, bool) {
	from := -1
	walkObject(b, skipSpace(b, 0), 0, func(k []byte, at int) int {
		if keyIs(k, key) {
			from = at
			return stop
		}
		return validValue(b, at, 1)
	})
	if from < 0 {
		return nil, false
	}
	return b[from:], true
}

// AppendObject appends a JSON object of the members of m, keys sorted, the
// values as they are (they must be valid JSON).
func AppendObject(dst []byte, m map[string]json.RawMessage) []byte {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	dst = append(dst, '{')
	for i, k := range keys {
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = appendKey(dst, k)
		dst = append(dst, m[k]...)
	}
	return append(dst, '}')
}

// appendKey appends "key": (JSON-quoted).
func appendKey(dst []byte, k string) []byte {
	q, _ := json.Marshal(k)
	dst = append(dst, q...)
	return append(dst, ':')
}

// The validating primitives. Each takes the index of the first byte of
// what it checks and returns the index just past it, or -1 if b does not
// hold a valid one there.

// maxDepth bounds the nesting of arrays and objects (as encoding/json's).
const maxDepth = 10000

// stop, returned by walkObject's member function, ends the walk early.
const stop = -2

// walkObject checks the object starting at b[i] ('{'), which depth
// containers enclose. For each member it calls member with the key (quoted,
// as sent) and the index where the value starts (< len(b)); member returns
// the end of the value — validValue(b, at, depth+1), or a walk of its own
// — or -1 to refuse it, or stop to end the walk (walkObject then returns
// stop).
func walkObject(b []byte, i, depth int, member func(key []byte, at int) int) int {
	if i >= len(b) || b[i] != '{' || depth >= maxDepth {
		return -1
	}
	i = skipSpace(b, i+1)
	if i < len(b) && b[i] == '}' {
		return i + 1
	}
	for {
		ke, at := objectKey(b, i)
		if at < 0 {
			return -1
		}
		e := member(b[i:ke], at)
		if e < 0 {
			return e
		}
		i = skipSpace(b, e)
		if i >= len(b) {
			return -1
		}
		switch b[i] {
		case ',':
			i = skipSpace(b, i+1)
		case '}':
			return i + 1
		default:
			return -1
		}
	}
}

// objectKey checks `"key" :` at b[i] and returns the end of the key and
// the start of its value (< len(b)), or at = -1.
func objectKey(b []byte, i int) (ke, at int) {
	if i >= len(b) || b[i] != '"' {
		return 0, -1
	}
	if ke, _ = scanString(b, i); ke < 0 {
		return 0, -1
	}
	at = skipSpace(b, ke)
	if at >= len(b) || b[at] != ':' {
		return 0, -1
	}
	if at = skipSpace(b, at+1); at >= len(b) {
		return 0, -1
	}
	return ke, at
}

// validValue checks the JSON value starting at b[i] (no leading space),
// which depth containers enclose.
func validValue(b []byte, i, depth int) int {
	if i >= len(b) {
		return -1
	}
	switch c := b[i]; {
	case c == '"':
		return validString(b, i)
	case '0' <= c && c <= '9':
		return validInteger(b, i)
	case c == '{' || c == '[':
		return validNested(b, i, depth)
	case c == '-':
		return validNumber(b, i)
	case c == 't':
		return literal(b, i, "true")
	case c == 'f':
		return literal(b, i, "false")
	case c == 'n':
		return literal(b, i, "null")
	}
	return -1
}

// validInteger is validNumber for a number that starts with a digit,
// quicker when it is an integer (as most are in events).
func validInteger(b []byte, i int) int {
	j := i + 1
	if b[i] != '0' {
		j = digits(b, j)
	}
	if j < len(b) && (b[j] == '.' || b[j]|0x20 == 'e') {
		return validNumber(b, i)
	}
	return j
}

// validNested checks the array or object starting at b[i]: closers[:n]
// holds, per open level, the byte that closes it (a level deeper than
// those is checked by a call of its own). Keys
// and string values are read here (not by a call to scanString): they are
// most of the tokens of an event.
func validNested(b []byte, i, depth int) int {
	var closers [64]byte
	n := 0
	key := false // b[i] starts an object's key, not a value
	for {
		// At the start of a key or value (i < len(b)), inside n levels.
		switch c := b[i]; {
		case c == '"':
			j := i + 1
			for len(b)-j >= 8 {
				if m := plainStops(binary.LittleEndian.Uint64(b[j:])); m != 0 {
					j += bits.TrailingZeros64(m) >> 3
					break
				}
				j += 8
			}
			if j < len(b) && b[j] == '"' {
				i = j + 1
			} else if i = scanStringRest(b, j); i < 0 {
				return -1
			}
			if key {
				if i < len(b) && b[i] == ':' {
					i++
				} else if i = skipSpace(b, i); i < len(b) && b[i] == ':' {
					i++
				} else {
					return -1
				}
				if i = skipSep(b, i); i >= len(b) {
					return -1
				}
				key = false
				continue
			}
		case key:
			return -1
		case '0' <= c && c <= '9':
			// validInteger, inlined.
			j := i + 1
			if c != '0' {
				j = digits(b, j)
			}
			if j < len(b) && (b[j] == '.' || b[j]|0x20 == 'e') {
				j = validNumber(b, i)
			}
			if i = j; i < 0 {
				return -1
			}
		case c == 'n':
			if i = literal(b, i, "null"); i < 0 {
				return -1
			}
		case c == '{' || c == '[':
			if depth+n >= maxDepth {
				return -1
			}
			if n == len(closers) {
				if i = validNested(b, i, depth+n); i < 0 {
					return -1
				}
				break
			}
			closer := c + 2 // '}' or ']'
			if i = skipSpace(b, i+1); i >= len(b) {
				return -1
			}
			if b[i] == closer {
				i++ // empty: a value at this level
				break
			}
			closers[n] = closer
			n++
			key = closer == '}'
			continue
		default:
			if i = validValue(b, i, depth+n); i < 0 {
				return -1
			}
		}
		// After a value: a separator, or the end of one or more levels.
		for {
			if n == 0 {
				return i
			}
			if i = skipSpace(b, i); i >= len(b) {
				return -1
			}
			top := closers[n-1]
			if b[i] == top {
				n--
				i++
				continue
			}
			if b[i] != ',' {
				return -1
			}
			if i = skipSep(b, i+1); i >= len(b) {
				return -1
			}
			key = top == '}'
			break
		}
	}
}

// strPlain marks the bytes a JSON string may hold as they are: anything
// but control characters, '"' and '\\'.
var strPlain = func() (t [256]bool) {
	for c := 0x20; c < 256; c++ {
		t[c] = c != '"' && c != '\\'
	}
	return t
}()

// validString checks the string starting at b[i] ('"').
func validString(b []byte, i int) int {
	e, _ := scanString(b, i)
	return e
}

// stringOrNullAt checks a member's value at b[at] that must be a string
// or null: it returns the value's end (-1 for anything else) and whether
// it is null (which leaves a field as it was, as encoding/json does).
func stringOrNullAt(b []byte, at int) (end int, null bool) {
	switch {
	case len(b)-at >= 4 && string(b[at:at+4]) == "null":
		return at + 4, true
	case b[at] != '"':
		return -1, false
	}
	end, _ = scanString(b, at)
	return end, false
}

// scanString checks the string starting at b[i] ('"') and returns the
// index just past it, or -1. plain reports that its content is ASCII
// without escapes: it decodes to itself. Plain content is read 8 bytes
// at a time.
func scanString(b []byte, i int) (end int, plain bool) {
	j := i + 1
	for len(b)-j >= 8 {
		if m := plainStops(binary.LittleEndian.Uint64(b[j:])); m != 0 {
			j += bits.TrailingZeros64(m) >> 3
			if b[j] == '"' {
				return j + 1, true
			}
			return scanStringRest(b, j), false
		}
		j += 8
	}
	for ; j < len(b); j++ {
		if c := b[j]; c == '"' {
			return j + 1, true
		} else if !strPlain[c] || c >= utf8.RuneSelf {
			return scanStringRest(b, j), false
		}
	}
	return -1, false
}

// scanStringRest checks the rest of a string from b[j] on, with escapes
// or bytes that are not ASCII.
func scanStringRest(b []byte, j int) int {
	for {
		for len(b)-j >= 8 {
			if m := stringStops(binary.LittleEndian.Uint64(b[j:])); m != 0 {
				j += bits.TrailingZeros64(m) >> 3
				break
			}
			j += 8
		}
		for j < len(b) && strPlain[b[j]] {
			j++
		}
		if j >= len(b) {
			return -1
		}
		switch b[j] {
		case '"':
			return j + 1
		case '\\':
			if j+1 >= len(b) {
				return -1
			}
			switch b[j+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				j += 2
			case 'u':
				if j+6 > len(b) || hex4(b[j+2:]) < 0 {
					return -1
				}
				j += 6
			default:
				return -1
			}
		default: // a control character
			return -1
		}
	}
}

// Word-wise string scanning: a byte of a little-endian uint64 w is marked
// by its high bit. The first mark (in memory order) is exact; the marks
// after it may be wrong (the subtractions borrow from them).
const (
	loBits = 0x0101010101010101
	hiBits = 0x8080808080808080
)

// stringStops marks the first byte of w that ends a run of string content
// as it may be sent: '"', '\\' or a control character; 0 if there is none.
func stringStops(w uint64) uint64 {
	q := w ^ (loBits * '"')
	s := w ^ (loBits * '\\')
	return ((q-loBits)&^q | (s-loBits)&^s | (w-loBits*0x20)&^w) & hiBits
}

// plainStops is stringStops that also stops at bytes that are not ASCII.
func plainStops(w uint64) uint64 {
	q := w ^ (loBits * '"')
	s := w ^ (loBits * '\\')
	return ((q - loBits) | (s - loBits) | (w - loBits*0x20) | w) & hiBits
}

// validNumber checks -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?.
func validNumber(b []byte, i int) int {
	if b[i] == '-' {
		i++
	}
	switch {
	case i < len(b) && b[i] == '0':
		i++
	case i < len(b) && '1' <= b[i] && b[i] <= '9':
		i = digits(b, i+1)
	default:
		return -1
	}
	if i < len(b) && b[i] == '.' {
		j := digits(b, i+1)
		if j == i+1 {
			return -1
		}
		i = j
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		j := digits(b, i)
		if j == i {
			return -1
		}
		i = j
	}
	return i
}

func digits(b []byte, i int) int {
	for i < len(b) && '0' <= b[i] && b[i] <= '9' {
		i++
	}
	return i
}

func literal(b []byte, i int, lit string) int {
	if len(b)-i >= len(lit) && string(b[i:i+len(lit)]) == lit {
		return i + len(lit)
	}
	return -1
}

func skipSpace(b []byte, i int) int {
	for i < len(b) {
		if c := b[i]; c > ' ' || jsonSpace>>c&1 == 0 {
			break
		}
		i++
	}
	return i
}

// skipSep is skipSpace, quicker where there is at most one space (as
// Python's json.dumps, and so ComfyUI, writes ": " and ", ").
func skipSep(b []byte, i int) int {
	if i < len(b) && b[i] == ' ' {
		i++
	}
	if i < len(b) && b[i] <= ' ' {
		return skipSpace(b, i)
	}
	return i
}

// jsonSpace has bit c set for the bytes c JSON allows between tokens.
const jsonSpace = 1<<' ' | 1<<'\t' | 1<<'\n' | 1<<'\r'

// hex4 decodes the 4 hex digits at the start of b, or returns -1.
func hex4(b []byte) rune {
	var r rune
	for _, c := range b[:4] {
		switch {
		case c >= '0' && c <= '9':
			c -= '0'
		case c >= 'a' && c <= 'f':
			c = c - 'a' + 10
		case c >= 'A' && c <= 'F':
			c = c - 'A' + 10
		default:
			return -1
		}
		r = r*16 + rune(c)
	}
	return r
}

// plainASCII reports whether a string's content needs no decoding.
func plainASCII(b []byte) bool {
	for _, c := range b {
		if c == '\\' || c >= utf8.RuneSelf {
			return false
		}
	}
	return true
}

// keyIs reports whether a valid quoted key, decoded, is want.
func keyIs(q []byte, want string) bool {
	raw := q[1 : len(q)-1]
	if len(raw) > 0 && raw[0] != '\\' && raw[0] < utf8.RuneSelf && (want == "" || raw[0] != want[0]) {
		return false // the decoded key starts with raw[0]
	}
	if plainASCII(raw) {
		return string(raw) == want
	}
	return unquote(q) == want
}

// unquote decodes a valid JSON string (quotes included) the way
// encoding/json does: invalid UTF-8 and unpaired surrogates become U+FFFD.
func unquote(q []byte) string {
	s := q[1 : len(q)-1]
	if plainASCII(s) {
		return string(s)
	}
	out := make([]byte, 0, len(s)+8)
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == '\\':
			switch s[i+1] {
			case 'b':
				out = append(out, '\b')
			case 'f':
				out = append(out, '\f')
			case 'n':
				out = append(out, '\n')
			case 'r':
				out = append(out, '\r')
			case 't':
				out = append(out, '\t')
			case 'u':
				r := hex4(s[i+2:])
				i += 6
				if utf16.IsSurrogate(r) {
					if len(s)-i >= 6 && s[i] == '\\' && s[i+1] == 'u' {
						if r2 := hex4(s[i+2:]); r2 >= 0 {
							if d := utf16.DecodeRune(r, r2); d != utf8.RuneError {
								out = utf8.AppendRune(out, d)
								i += 6
								continue
							}
						}
					}
					r = utf8.RuneError
				}
				out = utf8.AppendRune(out, r)
				continue
			default: // '"', '\\', '/'
				out = append(out, s[i+1])
			}
			i += 2
		case c < utf8.RuneSelf:
			out = append(out, c)
			i++
		default:
			r, n := utf8.DecodeRune(s[i:])
			if r == utf8.RuneError && n == 1 {
				out = utf8.AppendRune(out, utf8.RuneError)
			} else {
				out = append(out, s[i:i+n]...)
			}
			i += n
		}
	}
	return string(out)
}
