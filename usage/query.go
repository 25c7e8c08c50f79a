package usage

import (
	"fmt"
	"net/url"
	"time"
	"unicode/utf8"
)

// QueryError is a query parameter that is not valid; its message says
// which and why (for a 400).
type QueryError struct{ Msg string }

func (e *QueryError) Error() string { return e.Msg }

// ParseQuery reads since, until (YYYY-MM-DD, UTC; both default to today,
// since defaults to until when only until is given), user and pool from
// an admin API query, bounded: at most MaxQueryDays days, names at most
// 1024 bytes of UTF-8 without control characters. Unknown parameters are
// refused, so that a typo does not silently widen the answer.
func ParseQuery(v url.Values, now time.Time) (Query, error) {
	for k, vs := range v {
		switch k {
		case "since", "until", "user", "pool", "format":
		default:
			return Query{}, &QueryError{fmt.Sprintf("unknown parameter %q: use since, until, user, pool or format", Clip(k))}
		}
		if len(vs) > 1 {
			return Query{}, &QueryError{fmt.Sprintf("parameter %q given %d times", Clip(k), len(vs))}
		}
	}
	today := DayOf(now)
	q := Query{Since: v.Get("since"), Until: v.Get("until"), User: v.Get("user"), Pool: v.Get("pool")}
	if q.Until == "" {
		q.Until = today
	}
	if q.Since == "" {
		q.Since = q.Until
		if v.Get("until") == "" {
			q.Since = today
		}
	}
	since, err := time.Parse(DayLayout, q.Since)
	if err != nil {
		return Query{}, &QueryError{fmt.Sprintf("since %q: want a UTC day as YYYY-MM-DD", Clip(q.Since))}
	}
	until, err := time.Parse(DayLayout, q.Until)
	if err != nil {
		return Query{}, &QueryError{fmt.Sprintf("until %q: want a UTC day as YYYY-MM-DD", Clip(q.Until))}
	}
	if until.Before(since) {
		return Query{}, &QueryError{fmt.Sprintf("until %s is before since %s", q.Until, q.Since)}
	}
	if days := int(until.Sub(since)/(24*time.Hour)) + 1; days > MaxQueryDays {
		return Query{}, &QueryError{fmt.Sprintf("%s to %s is %d days: ask for at most %d at once", q.Since, q.Until, days, MaxQueryDays)}
	}
	for name, s := range map[string]string{"user": q.User, "pool": q.Pool} {
		if err := checkName(name, s); err != nil {
			return Query{}, err
		}
	}
	return q, nil
}

// checkName bounds a user or pool name from outside.
func checkName(what, s string) error {
	if len(s) > maxUserName {
		return &QueryError{fmt.Sprintf("%s is %d bytes long: at most %d", what, len(s), maxUserName)}
	}
	if !utf8.ValidString(s) {
		return &QueryError{what + " is not valid UTF-8"}
	}
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			return &QueryError{what + " holds a control character"}
		}
	}
	return nil
}

// CheckUser checks a user name given to the admin API (raise, reset).
func CheckUser(s string) error {
	if s == "" {
		return &QueryError{"user is empty"}
	}
	return checkName("user", s)
}

// Clip shortens a value from outside to quote it in an error message.
func Clip(s string) string {
	const n = 32
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
