package comfy

import (
	"bytes"
	"encoding/binary"
)

// A GPU server's stream is mostly two kinds of frames, one after the
// other at every sampler step: progress and progress_state. Each is the
// same as the stream's previous one of its kind but for a few digits (the
// step's value), and progress_state, a snapshot of every node that has
// started, is the larger and the more costly to scan. A Scanner keeps the
// last of each kind it scanned and reads the Head of a frame that differs
// from it only in digits, outside the values the Head is read from, by
// comparing the two, eight bytes at a time, instead of scanning it.

// A Scanner reads the Heads of one stream's event frames, as
// ScanEventLike does with the stream's previous Head. Its zero value is
// ready; it is not safe for concurrent use.
type Scanner struct {
	last Head
	kept [2]keptFrame // progress, progress_state
}

// keptFrame is a frame the Scanner scanned whole and the Head it read.
type keptFrame struct {
	frame []byte
	head  Head
	where headSpans
}

// Frames kept for comparison are at most this large (a progress_state of
// tens of nodes); larger ones are always scanned.
const maxKeptFrame = 8 << 10

// Scan reads b's Head: what ScanEvent(b) returns, with strings equal to
// those of the stream's previous events shared with them (ScanEventLike).
//
// A frame of the same length as the last progress or progress_state
// frame the Scanner scanned whole, the same but for digits that replace
// digits, is the same JSON but for the values of numbers and the digits
// within strings: valid when that one was (given that no digit that
// starts a number becomes a 0 before another digit, and that the kept
// frame has no escapes, so no digit changes what an escape stands for),
// with the same members. Its Head is that frame's, unless a changed digit
// lies in a value the Head is read from: then, as in every other case,
// the frame is scanned whole.
func (s *Scanner) Scan(b []byte) (Head, bool) {
	for i := range s.kept {
		// (An empty slot keeps no frame: it matches none, the empty one
		// included.)
		if k := &s.kept[i]; len(k.frame) == len(b) && len(b) > 0 && k.sameButDigits(b) {
			return k.head, true
		}
	}
	var where headSpans
	h, ok := scanHead(b, &s.last, &where)
	if !ok {
		return h, false
	}
	if h.PromptID != "" {
		s.last.PromptID = h.PromptID
	}
	if h.Node != "" {
		s.last.Node = h.Node
	}
	if h.DisplayNode != "" {
		s.last.DisplayNode = h.DisplayNode
	}
	slot := -1
	switch h.Type {
	case MsgProgress:
		slot = 0
	case MsgProgressState:
		slot = 1
	}
	if slot >= 0 && len(b) <= maxKeptFrame && bytes.IndexByte(b, '\\') < 0 {
		k := &s.kept[slot]
		k.frame = append(k.frame[:0], b...)
		k.head, k.where = h, where
	}
	return h, true
}

// sameButDigits reports whether b (as long as the kept frame) differs
// from it only where a digit replaces a digit, outside the Head's values,
// with no digit that starts a number turned into a leading zero.
func (k *keptFrame) sameButDigits(b []byte) bool {
	p := k.frame[:len(b)]
	i := 0
	for ; i+8 <= len(b); i += 8 {
		if binary.LittleEndian.Uint64(p[i:]) == binary.LittleEndian.Uint64(b[i:]) {
			continue
		}
		for j := i; j < i+8; j++ {
			if p[j] != b[j] && !k.digitFor(b, j) {
				return false
			}
		}
	}
	for j := i; j < len(b); j++ {
		if p[j] != b[j] && !k.digitFor(b, j) {
			return false
		}
	}
	return true
}

// digitFor reports whether b[j], which differs from the kept frame's
// byte there, is a digit in the place of a digit that may change.
func (k *keptFrame) digitFor(b []byte, j int) bool {
	if !isDigit(b[j]) || !isDigit(k.frame[j]) {
		return false
	}
	// "10" → "00": a number's first digit turned 0 before another digit
	// (also refused where it is harmless: an exponent, a string).
	if b[j] == '0' && (j == 0 || !isDigit(b[j-1])) && j+1 < len(b) && isDigit(b[j+1]) {
		return false
	}
	for _, w := range k.where {
		if j >= w.at && j < w.end {
			return false
		}
	}
	return true
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }
