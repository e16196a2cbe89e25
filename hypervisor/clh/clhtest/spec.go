// Package clhtest is a fake Cloud Hypervisor API for tests: a server on a
// unix socket that checks every request against colo's contract with CH's
// API (contract.go) and answers with the status codes it lists. It keeps a
// VM's state as far as colo's driver looks at it, and records what it
// received, file descriptors included.
package clhtest

import (
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"slices"
	"sort"
	"strings"
)

// Spec checks requests and answers against the contract.
type Spec struct {
	endpoints map[string]Endpoint
}

// NewSpec is a Spec of Contract.
func NewSpec() *Spec {
	return &Spec{endpoints: Contract()}
}

// operation is the contract's entry for method on /endpoint.
func (s *Spec) operation(method, endpoint string) (Endpoint, error) {
	op, ok := s.endpoints[endpoint]
	if !ok {
		return Endpoint{}, fmt.Errorf("no path /%s in the contract", endpoint)
	}
	if op.Method != method {
		return Endpoint{}, fmt.Errorf("no %s /%s in the contract (it is %s)", method, endpoint, op.Method)
	}
	return op, nil
}

// CheckRequest checks a request: the path and method exist, a body is
// there if the operation takes one and none if it has none, and the body
// matches the schema (known fields, required ones present, types, enums,
// minimums).
func (s *Spec) CheckRequest(method, endpoint string, body []byte) error {
	op, err := s.operation(method, endpoint)
	if err != nil {
		return err
	}
	if op.Body == nil {
		if len(body) > 0 {
			return fmt.Errorf("%s /%s takes no body, got %q", method, endpoint, body)
		}
		return nil
	}
	if len(body) == 0 {
		return fmt.Errorf("%s /%s: the body is required", method, endpoint)
	}
	var v any
	if err := json.Unmarshal(body, &v); err != nil {
		return fmt.Errorf("%s /%s: body: %w", method, endpoint, err)
	}
	if errs := validate(v, *op.Body, "body"); len(errs) > 0 {
		return fmt.Errorf("%s /%s: %s", method, endpoint, strings.Join(errs, "; "))
	}
	return nil
}

// CheckResponse checks that code is a status the contract lists for the
// operation, and that a body it describes matches its schema.
func (s *Spec) CheckResponse(method, endpoint string, code int, body []byte) error {
	op, err := s.operation(method, endpoint)
	if err != nil {
		return err
	}
	schema, ok := op.Responses[code]
	if !ok {
		return fmt.Errorf("%s /%s: status %d is not in the contract (%v)", method, endpoint, code, slices.Sorted(maps.Keys(op.Responses)))
	}
	switch {
	case schema == nil && len(body) > 0:
		return fmt.Errorf("%s /%s: status %d has no body in the contract, got %q", method, endpoint, code, body)
	case schema != nil:
		var v any
		if err := json.Unmarshal(body, &v); err != nil {
			return fmt.Errorf("%s /%s: answer: %w", method, endpoint, err)
		}
		if errs := validate(v, *schema, "answer"); len(errs) > 0 {
			return fmt.Errorf("%s /%s: %s", method, endpoint, strings.Join(errs, "; "))
		}
	}
	return nil
}

// validate checks v against schema; where names v in messages.
func validate(v any, schema Schema, where string) []string {
	var errs []string
	if schema.Enum != nil {
		if s, ok := v.(string); !ok || !slices.Contains(schema.Enum, s) {
			errs = append(errs, fmt.Sprintf("%s: %v is not one of %v", where, v, schema.Enum))
		}
	}
	switch schema.Type {
	case Object:
		obj, ok := v.(map[string]any)
		if !ok {
			return append(errs, fmt.Sprintf("%s: want an object, got %T", where, v))
		}
		for _, r := range schema.Required {
			if _, ok := obj[r]; !ok {
				errs = append(errs, fmt.Sprintf("%s: required field %q missing", where, r))
			}
		}
		for _, k := range slices.Sorted(maps.Keys(obj)) {
			if f, ok := schema.Fields[k]; ok {
				errs = append(errs, validate(obj[k], f, where+"."+k)...)
				continue
			}
			if schema.Values != nil {
				errs = append(errs, validate(obj[k], *schema.Values, where+"."+k)...)
				continue
			}
			known := slices.Sorted(maps.Keys(schema.Fields))
			errs = append(errs, fmt.Sprintf("%s: unknown field %q (known: %s)", where, k, strings.Join(known, ", ")))
		}
	case Array:
		arr, ok := v.([]any)
		if !ok {
			return append(errs, fmt.Sprintf("%s: want an array, got %T", where, v))
		}
		if schema.Items != nil {
			for i, e := range arr {
				errs = append(errs, validate(e, *schema.Items, fmt.Sprintf("%s[%d]", where, i))...)
			}
		}
	case Integer:
		n, ok := v.(float64)
		if !ok || n != math.Trunc(n) {
			return append(errs, fmt.Sprintf("%s: want an integer, got %v", where, v))
		}
		if schema.Minimum != nil && n < float64(*schema.Minimum) {
			errs = append(errs, fmt.Sprintf("%s: %v is below the minimum %v", where, n, *schema.Minimum))
		}
	case String:
		if _, ok := v.(string); !ok {
			errs = append(errs, fmt.Sprintf("%s: want a string, got %T", where, v))
		}
	case Boolean:
		if _, ok := v.(bool); !ok {
			errs = append(errs, fmt.Sprintf("%s: want a boolean, got %T", where, v))
		}
	default:
		errs = append(errs, fmt.Sprintf("%s: the contract's schema has no type", where))
	}
	sort.Strings(errs)
	return errs
}
