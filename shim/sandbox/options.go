package sandbox

import (
	"fmt"

	runcoptions "github.com/containerd/containerd/api/types/runc/options"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/colo-runtime/colo/config"
)

// ConfigPath returns the ConfigPath runtime option of a create request, or
// "" when there is none. containerd sends it as runtimeoptions.v1.Options
// (`ctr run --runtime-config-path`, and the CRI plugin's `options` table for
// any runtime type other than runc's). The runc shim's Options (which have
// no ConfigPath in this API version) are accepted and carry no path.
func ConfigPath(opts *anypb.Any) (string, error) {
	if opts == nil || opts.GetTypeUrl() == "" {
		return "", nil
	}
	v, err := typeurl.UnmarshalAny(opts)
	if err != nil {
		return "", errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("runtime options of type %s: %v", opts.GetTypeUrl(), err))
	}
	switch o := v.(type) {
	case *runtimeoptions.Options:
		return o.GetConfigPath(), nil
	case *runcoptions.Options:
		return "", nil
	}
	return "", errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("runtime options of type %s are not supported", opts.GetTypeUrl()))
}

// LoadConfig loads the configuration a create request asks for: the
// ConfigPath runtime option, else $COLO_CONFIG, else config.DefaultPath.
func LoadConfig(opts *anypb.Any) (config.Config, error) {
	p, err := ConfigPath(opts)
	if err != nil {
		return config.Config{}, err
	}
	c, err := config.Load(p)
	if err != nil {
		return config.Config{}, errdefs.ErrInvalidArgument.WithMessage(err.Error())
	}
	return c, nil
}
