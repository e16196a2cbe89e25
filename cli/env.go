package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"reflect"
	"strings"

	"github.com/pelletier/go-toml/v2"

	"github.com/colo-runtime/colo/config"
)

// envCmd prints the effective configuration as TOML, after a comment line
// naming the file it came from.
func envCmd(ctx context.Context, e *env, args []string) error {
	if len(args) > 0 {
		return usageError("env takes no arguments, got %s", quoted(strings.Join(args, " ")))
	}
	return printEnv(e.stdout, e.cfg, configSource(e.cfg, e.configPath))
}

// printEnv writes the configuration as TOML, each section in full, after
// a comment line with source.
func printEnv(w io.Writer, cfg config.Config, source string) error {
	b, err := toml.Marshal(cfg)
	if err != nil {
		return fmt.Errorf("encode the configuration as TOML: %w", err)
	}
	fmt.Fprintf(w, "# %s\n", source)
	_, err = w.Write(b)
	return err
}

// configSource tells where cfg came from, following config.Load's order:
// the --config file, $COLO_CONFIG, config.DefaultPath if it exists, else
// the built-in defaults. The file found is read again and must still give
// cfg: one changed since would not be what is printed.
func configSource(cfg config.Config, flagPath string) string {
	path, how := flagPath, "--config"
	if path == "" {
		path, how = os.Getenv(config.EnvPath), "$"+config.EnvPath
	}
	if path == "" {
		path, how = config.DefaultPath, "the default path"
		if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
			return fmt.Sprintf("built-in defaults: no %s, no $%s, no file named by --config", config.DefaultPath, config.EnvPath)
		}
	}
	if again, err := config.Load(path); err != nil || !reflect.DeepEqual(again, cfg) {
		return fmt.Sprintf("from a file, but %s (%s) no longer reads as this configuration", path, how)
	}
	return fmt.Sprintf("from %s (%s), over the built-in defaults", path, how)
}
