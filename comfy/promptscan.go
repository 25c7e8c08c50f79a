package comfy

import "encoding/json"

// A POST /prompt body is megabytes of UI workflow around a small prompt.
// It is checked and split in one pass over its bytes: validValue finds the
// end of a JSON value while checking it as json.Valid would, so the body
// needs no separate validation pass, and nothing is decoded but the keys.

// maxDepth bounds the nesting of arrays and objects (as encoding/json's).
const maxDepth = 10000

// strPlain marks the bytes a JSON string may hold as they are: anything
// but control characters, '"' and '\\'.
var strPlain = func() (t [256]bool) {
	for c := 0x20; c < 256; c++ {
		t[c] = c != '"' && c != '\\'
	}
	return t
}()

// validString returns the index just past the string starting at b[i]
// ('"'), or -1 if it is not a valid JSON string.
func validString(b []byte, i int) int {
	j := i + 1
	for {
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
				if j+6 > len(b) || !isHex(b[j+2]) || !isHex(b[j+3]) || !isHex(b[j+4]) || !isHex(b[j+5]) {
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

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }

// validNumber returns the index just past the number starting at b[i], or
// -1.
func validNumber(b []byte, i int) int {
	j := i
	if j < len(b) && b[j] == '-' {
		j++
	}
	switch {
	case j < len(b) && b[j] == '0':
		j++
	case j < len(b) && '1' <= b[j] && b[j] <= '9':
		for j < len(b) && isDigit(b[j]) {
			j++
		}
	default:
		return -1
	}
	if j < len(b) && b[j] == '.' {
		j++
		if j >= len(b) || !isDigit(b[j]) {
			return -1
		}
		for j < len(b) && isDigit(b[j]) {
			j++
		}
	}
	if j < len(b) && (b[j] == 'e' || b[j] == 'E') {
		j++
		if j < len(b) && (b[j] == '+' || b[j] == '-') {
			j++
		}
		if j >= len(b) || !isDigit(b[j]) {
			return -1
		}
		for j < len(b) && isDigit(b[j]) {
			j++
		}
	}
	return j
}

// validValue returns the index just past the JSON value starting at b[i]
// (no leading space), or -1 if there is no valid value there.
func validValue(b []byte, i int) int {
	if i >= len(b) {
		return -1
	}
	switch c := b[i]; {
	case c == '"':
		return validString(b, i)
	case c == '{' || c == '[':
		return validNested(b, i)
	case c == '-' || isDigit(c):
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

func literal(b []byte, i int, lit string) int {
	if len(b)-i >= len(lit) && string(b[i:i+len(lit)]) == lit {
		return i + len(lit)
	}
	return -1
}

// validNested checks the array or object starting at b[i] without
// recursion: closers holds, per open level, the byte that closes it.
func validNested(b []byte, i int) int {
	var stack [64]byte
	closers := stack[:0]
	for {
		// At the start of a value (i), inside len(closers) levels.
		switch b[i] {
		case '{':
			if len(closers) >= maxDepth {
				return -1
			}
			i = skipSpace(b, i+1)
			if i < len(b) && b[i] == '}' {
				i++ // empty: a value at this level
				break
			}
			closers = append(closers, '}')
			if i = objectKey(b, i); i < 0 {
				return -1
			}
			continue
		case '[':
			if len(closers) >= maxDepth {
				return -1
			}
			i = skipSpace(b, i+1)
			if i < len(b) && b[i] == ']' {
				i++ // empty: a value at this level
				break
			}
			closers = append(closers, ']')
			if i >= len(b) {
				return -1
			}
			continue
		default:
			if i = validValue(b, i); i < 0 {
				return -1
			}
		}
		// After a value: a separator, or the end of one or more levels.
		for {
			if len(closers) == 0 {
				return i
			}
			i = skipSpace(b, i)
			if i >= len(b) {
				return -1
			}
			top := closers[len(closers)-1]
			if b[i] == top {
				closers = closers[:len(closers)-1]
				i++
				continue
			}
			if b[i] != ',' {
				return -1
			}
			i = skipSpace(b, i+1)
			if top == '}' {
				if i = objectKey(b, i); i < 0 {
					return -1
				}
			}
			if i >= len(b) {
				return -1
			}
			break
		}
	}
}

// objectKey checks `"key" :` at b[i] and returns the start of its value.
func objectKey(b []byte, i int) int {
	if i >= len(b) || b[i] != '"' {
		return -1
	}
	if i = validString(b, i); i < 0 {
		return -1
	}
	i = skipSpace(b, i)
	if i >= len(b) || b[i] != ':' {
		return -1
	}
	i = skipSpace(b, i+1)
	if i >= len(b) {
		return -1
	}
	return i
}

// validMembers is eachMember for input not yet validated: it checks each
// value as it finds its end. value, when not nil, replaces the check for
// one member's value (it returns the value's end, or -1). It reports
// where the object ends, or -1 if b[i:] does not start with a valid
// object.
func validMembers(b []byte, i int, f func(key string, value []byte), value func(key string, at int) int) int {
	if i >= len(b) || b[i] != '{' {
		return -1
	}
	i = skipSpace(b, i+1)
	if i < len(b) && b[i] == '}' {
		return i + 1
	}
	for {
		if i >= len(b) || b[i] != '"' {
			return -1
		}
		e := validString(b, i)
		if e < 0 {
			return -1
		}
		key, ok := decodeKey(b[i:e])
		if !ok {
			return -1
		}
		i = skipSpace(b, e)
		if i >= len(b) || b[i] != ':' {
			return -1
		}
		i = skipSpace(b, i+1)
		if value != nil {
			e = value(key, i)
		} else {
			e = validValue(b, i)
		}
		if e < 0 {
			return -1
		}
		if f != nil {
			f(key, b[i:e:e])
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

// decodeKey decodes a valid JSON string (quotes included).
func decodeKey(q []byte) (string, bool) {
	if plainASCII(q[1 : len(q)-1]) {
		return string(q[1 : len(q)-1]), true
	}
	var key string
	return key, json.Unmarshal(q, &key) == nil // escapes, UTF-8 replacement
}

// splitPromptBody checks that body is one valid JSON object (as json.Valid
// would) and splits it into its top-level members and those of its
// extra_data object, in one pass. extra is nil when the last extra_data
// is missing or not an object. ok is false if body is not a valid object.
func splitPromptBody(body []byte) (raw map[string]json.RawMessage, extra []Member, ok bool) {
	raw = make(map[string]json.RawMessage, 8)
	end := validMembers(body, skipSpace(body, 0), func(k string, v []byte) {
		raw[k] = v // the last of a repeated key, like json.Unmarshal
	}, func(key string, at int) int {
		if key != "extra_data" {
			return validValue(body, at)
		}
		extra = nil
		if at >= len(body) || body[at] != '{' {
			return validValue(body, at)
		}
		var ms []Member
		e := validMembers(body, at, func(k string, v []byte) { ms = append(ms, Member{k, v}) }, nil)
		extra = ms
		if extra == nil {
			extra = []Member{} // an empty object
		}
		return e
	})
	if end < 0 || skipSpace(body, end) != len(body) {
		return nil, nil, false
	}
	return raw, extra, true
}
