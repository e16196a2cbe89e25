package clhtest

// The contract is colo's own statement of the part of Cloud Hypervisor's
// REST API the clh driver relies on: the endpoints it calls, the fields it
// sends and reads with their JSON types, what CH requires of a request, the
// enums and minimums the driver's values must meet, and the status codes
// CH answers with. It was written by reading CH's OpenAPI description
//
//	repository: https://github.com/cloud-hypervisor/cloud-hypervisor
//	path:       vmm/src/api/openapi/cloud-hypervisor.yaml
//	commit:     00f68228812d8dfeb50369c597b18e06cea42b10
//
// and is checked against that, not copied from it. It is narrower than
// CH's API on purpose: a field the driver starts to send must be added
// here after reading the spec (and so be looked at), or the fake rejects
// it as unknown. Every endpoint, field and status below is in v51 (the
// release Kata pins) as well.

// Kind is a JSON type.
type Kind string

// JSON types as the contract names them.
const (
	Object  Kind = "object"
	Array   Kind = "array"
	Integer Kind = "integer"
	String  Kind = "string"
	Boolean Kind = "boolean"
)

// Schema is what a JSON value must be.
type Schema struct {
	Type Kind
	// Fields are an object's known fields; any other is an error, unless
	// Values is set.
	Fields map[string]Schema
	// Required are the fields an object must have.
	Required []string
	// Values is the schema of every field of an object whose field
	// names are data (a map by id), instead of Fields.
	Values *Schema
	// Items is the schema of an array's elements.
	Items *Schema
	// Enum, if set, are the values a string may have.
	Enum []string
	// Minimum, if set, is the least an integer may be.
	Minimum *int64
}

// Endpoint is one operation of CH's API, by its path under /api/v1/.
type Endpoint struct {
	Method string
	// Body is the request body's schema; nil: the operation takes none.
	// Every body colo sends is one CH requires.
	Body *Schema
	// Responses are the status codes CH answers with, each with the
	// schema of its body (nil: no body).
	Responses map[int]*Schema
}

// Contract is the contract by endpoint ("vm.create"). A function, not a
// package variable: each caller gets its own.
func Contract() map[string]Endpoint {
	pciDeviceInfo := &Schema{
		Type:     Object,
		Required: []string{"id", "bdf"},
		Fields:   map[string]Schema{"id": str(), "bdf": str()},
	}
	// The answers of the hot-plug calls: 200 with where the device is
	// (hot-plugged into a running VM), 204 (cold-plugged into a created
	// one), or an error.
	addResponses := func(codes ...int) map[int]*Schema {
		r := map[int]*Schema{200: pciDeviceInfo, 204: nil}
		for _, c := range codes {
			r[c] = nil
		}
		return r
	}
	noBody := func(codes ...int) map[int]*Schema {
		r := map[int]*Schema{}
		for _, c := range codes {
			r[c] = nil
		}
		return r
	}
	return map[string]Endpoint{
		"vmm.ping": {Method: "GET", Responses: map[int]*Schema{200: {
			Type:     Object,
			Required: []string{"version"},
			Fields:   map[string]Schema{"version": str(), "build_version": str(), "pid": integer()},
		}}},
		"vmm.shutdown": {Method: "PUT", Responses: noBody(204)},
		"vm.create":    {Method: "PUT", Body: vmConfig(), Responses: noBody(204)},
		"vm.boot":      {Method: "PUT", Responses: noBody(204, 404)},
		"vm.info": {Method: "GET", Responses: map[int]*Schema{
			200: {
				Type:     Object,
				Required: []string{"config", "state"},
				Fields: map[string]Schema{
					"config":             *vmConfig(),
					"state":              {Type: String, Enum: []string{"Created", "Running", "Shutdown", "Paused", "BreakPoint"}},
					"memory_actual_size": integer(),
					// By device id. Of each node colo reads its id,
					// its children's ids and its PCI address.
					"device_tree": {Type: Object, Values: &Schema{
						Type: Object,
						Fields: map[string]Schema{
							"id":       str(),
							"children": {Type: Array, Items: ptr(str())},
							"pci_bdf":  str(),
						},
					}},
				},
			},
			404: nil,
		}},
		// The TAP's descriptor travels beside the body (SCM_RIGHTS), so
		// the body names no tap.
		"vm.add-net":  {Method: "PUT", Body: netConfig(), Responses: addResponses(400, 404, 409, 500)},
		"vm.add-disk": {Method: "PUT", Body: diskConfig(), Responses: addResponses(400, 404, 409, 500)},
		// VFIO, by the device's sysfs path.
		"vm.add-device": {Method: "PUT", Body: deviceConfig(), Responses: addResponses(400, 404, 409)},
		"vm.remove-device": {Method: "PUT", Body: &Schema{
			Type:   Object,
			Fields: map[string]Schema{"id": str()},
		}, Responses: noBody(204, 404)},
		// 429: a vCPU removal is still pending, the client retries.
		"vm.resize": {Method: "PUT", Body: &Schema{
			Type: Object,
			Fields: map[string]Schema{
				"desired_vcpus":   {Type: Integer, Minimum: ptr(int64(1))},
				"desired_ram":     integer(), // bytes
				"desired_balloon": integer(), // bytes
			},
		}, Responses: noBody(204, 404, 429)},
		"vm.shutdown": {Method: "PUT", Responses: noBody(204, 404, 405)},
		"vm.pause":    {Method: "PUT", Responses: noBody(204, 404, 405)},
		"vm.resume":   {Method: "PUT", Responses: noBody(204, 404, 405)},
		"vm.coredump": {Method: "PUT", Body: &Schema{
			Type:   Object,
			Fields: map[string]Schema{"destination_url": str()}, // file:///path
		}, Responses: noBody(204, 404, 405)},
	}
}

// vmConfig is VmConfig, the body of vm.create and the config of vm.info,
// as far as colo fills it in: the NICs come with vm.add-net, disks with
// vm.add-disk (CH lists both here once added).
func vmConfig() *Schema {
	// Where a console goes: CH's ConsoleMode.
	mode := Schema{Type: String, Enum: []string{"Off", "Pty", "Tty", "File", "Socket", "Null"}}
	return &Schema{
		Type:     Object,
		Required: []string{"payload"},
		Fields: map[string]Schema{
			"payload": {Type: Object, Fields: map[string]Schema{
				"kernel": str(), "initramfs": str(), "cmdline": str(),
			}},
			"cpus": {
				Type:     Object,
				Required: []string{"boot_vcpus", "max_vcpus"},
				Fields: map[string]Schema{
					"boot_vcpus": {Type: Integer, Minimum: ptr(int64(1))},
					"max_vcpus":  {Type: Integer, Minimum: ptr(int64(1))},
				},
			},
			"memory": {
				Type:     Object,
				Required: []string{"size"},
				Fields: map[string]Schema{
					// Bytes, all three.
					"size":            integer(),
					"hotplug_size":    integer(),
					"hotplugged_size": integer(),
					// A plain string in the spec; CH's HotplugMethod
					// (serde, case as written) has these two.
					"hotplug_method": {Type: String, Enum: []string{"Acpi", "VirtioMem"}},
					"shared":         boolean(),
				},
			},
			// The serial port (ttyS0): SerialConfig.
			"serial": {Type: Object, Required: []string{"mode"}, Fields: map[string]Schema{
				"mode": mode, "file": str(),
			}},
			// The virtio console (hvc0): ConsoleConfig.
			"console": {Type: Object, Required: []string{"mode"}, Fields: map[string]Schema{
				"mode": mode, "file": str(),
			}},
			// Hybrid vsock: the host's end is the unix socket.
			"vsock": {Type: Object, Required: []string{"cid", "socket"}, Fields: map[string]Schema{
				"cid":    {Type: Integer, Minimum: ptr(int64(3))},
				"socket": str(),
			}},
			"balloon": {Type: Object, Required: []string{"size"}, Fields: map[string]Schema{
				"size":                integer(), // bytes
				"free_page_reporting": boolean(),
			}},
			// virtio-fs, to a running virtiofsd's socket.
			"fs": {Type: Array, Items: &Schema{
				Type:     Object,
				Required: []string{"num_queues", "queue_size", "socket", "tag"},
				Fields: map[string]Schema{
					"tag": str(), "socket": str(), "num_queues": integer(), "queue_size": integer(), "id": str(),
				},
			}},
			// VFIO devices cold-plugged.
			"devices": {Type: Array, Items: deviceConfig()},
			"disks":   {Type: Array, Items: diskConfig()},
			"net":     {Type: Array, Items: netConfig()},
			"pvpanic": boolean(),
		},
	}
}

// netConfig is NetConfig as vm.add-net takes it from colo.
func netConfig() *Schema {
	return &Schema{Type: Object, Fields: map[string]Schema{
		"mac": str(), "mtu": integer(), "id": str(), "num_queues": integer(),
	}}
}

// diskConfig is DiskConfig as vm.add-disk takes it from colo.
func diskConfig() *Schema {
	return &Schema{Type: Object, Fields: map[string]Schema{
		"path": str(), "readonly": boolean(), "id": str(),
	}}
}

// deviceConfig is DeviceConfig (VFIO) as vm.add-device and vm.create take
// it from colo.
func deviceConfig() *Schema {
	return &Schema{Type: Object, Fields: map[string]Schema{
		"path": str(), "id": str(),
	}}
}

func str() Schema     { return Schema{Type: String} }
func integer() Schema { return Schema{Type: Integer} }
func boolean() Schema { return Schema{Type: Boolean} }

func ptr[T any](v T) *T { return &v }
