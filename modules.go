package comfyume

// Importing this package registers every comfyume Caddy module, so the
// plugin convention works as written:
//
//	xcaddy build --with github.com/comfyume/comfyume
import _ "github.com/comfyume/comfyume/caddymodule"
