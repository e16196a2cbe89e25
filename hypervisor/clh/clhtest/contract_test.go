package clhtest

import (
	"fmt"
	"maps"
	"slices"
	"testing"
)

// TestContractWellFormed: every schema has a type, required fields are
// known ones, enums are of strings and minimums of integers, and every
// endpoint has a method and its status codes; a slip in the table would
// otherwise make the validator accept or reject the wrong things.
func TestContractWellFormed(t *testing.T) {
	var check func(s Schema, where string)
	check = func(s Schema, where string) {
		switch s.Type {
		case Object, Array, Integer, String, Boolean:
		default:
			t.Errorf("%s: type %q", where, s.Type)
		}
		for _, r := range s.Required {
			if _, ok := s.Fields[r]; !ok {
				t.Errorf("%s: required field %q is not among its fields %v", where, r, slices.Sorted(maps.Keys(s.Fields)))
			}
		}
		if (len(s.Fields) > 0 || s.Values != nil) && s.Type != Object {
			t.Errorf("%s: fields on a %s", where, s.Type)
		}
		if s.Items != nil != (s.Type == Array) {
			t.Errorf("%s: items and type %s disagree", where, s.Type)
		}
		if s.Enum != nil && s.Type != String {
			t.Errorf("%s: enum on a %s", where, s.Type)
		}
		if s.Minimum != nil && s.Type != Integer {
			t.Errorf("%s: minimum on a %s", where, s.Type)
		}
		for k, f := range s.Fields {
			check(f, where+"."+k)
		}
		if s.Values != nil {
			check(*s.Values, where+".*")
		}
		if s.Items != nil {
			check(*s.Items, where+"[]")
		}
	}
	c := Contract()
	if len(c) == 0 {
		t.Fatal("empty contract")
	}
	for name, ep := range c {
		if ep.Method != "GET" && ep.Method != "PUT" {
			t.Errorf("%s: method %q", name, ep.Method)
		}
		if len(ep.Responses) == 0 {
			t.Errorf("%s: no status codes", name)
		}
		if ep.Body != nil {
			check(*ep.Body, name+" body")
		}
		for code, s := range ep.Responses {
			if code < 200 || code > 599 {
				t.Errorf("%s: status %d", name, code)
			}
			if s != nil {
				check(*s, fmt.Sprintf("%s %d", name, code))
			}
		}
	}
}
