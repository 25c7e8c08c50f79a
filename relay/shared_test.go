package relay

import "testing"

// A user's sids at a shared home are theirs alone: no other user and
// clientId (moving bytes between the two) makes the same sid, and only the
// user's own are recognised as theirs.
func TestSharedSIDsAreEachUsers(t *testing.T) {
	alice := SharedSID("alice", "bob")
	for _, other := range [][2]string{{"ali", "cebob"}, {"alicebob", ""}, {"", "alicebob"}, {"bob", "alice"}} {
		if s := SharedSID(other[0], other[1]); s == alice || ownsHomeSID("alice", s) {
			t.Errorf("user %q clientId %q: %s, alice's %s", other[0], other[1], s, alice)
		}
	}
	if len(alice) != 32 || !ownsHomeSID("alice", alice) || ownsHomeSID("bob", alice) || ownsHomeSID("alice", "bob") {
		t.Errorf("alice's sid %q not recognised as hers alone", alice)
	}
	if SharedSID("alice", "bob") != alice {
		t.Errorf("alice's sid is not stable")
	}
	if s := SharedSID("alice", "bob "); s == alice || !ownsHomeSID("alice", s) {
		t.Errorf("alice's other clientId: %s (hers for %q: %s)", s, "bob", alice)
	}
	if (Site{User: "alice"}).HomeSID("bob") != "bob" || (Site{User: "alice", SharedHome: true}).HomeSID("bob") != alice {
		t.Errorf("HomeSID: a home of the user's own takes the clientId as is, a shared one the user's sid")
	}
}
