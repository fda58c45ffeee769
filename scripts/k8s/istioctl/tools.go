//go:build tools

// Package tools pins istioctl as this module's only dependency.
package tools

import _ "istio.io/istio/istioctl/cmd/istioctl"
