import { Flags } from '@oclif/core';
import type { KubeAccessOptions } from '../platform/kube/kubeconfig.js';
import { UsageError } from './base-command.js';
import { KUBE_NAME, isKubeName } from './config.js';

/** Seconds to wait for one answer of the API server, when no flag or mirrord.json says. */
export const DEFAULT_REQUEST_TIMEOUT_S = 20;

/** A flag whose value is a Kubernetes object name: refused as such, whatever the command. */
export const kubeName = Flags.custom<string>({
  parse: async (value, _context, flag) => {
    if (!isKubeName(value)) {
      throw new UsageError(`--${flag.name} "${value}" is not ${KUBE_NAME}`);
    }
    return value;
  },
});

/**
 * The flags that say how to reach the cluster, shared by every command that talks to it, so
 * that they read and default the same everywhere (as kubectl's do).
 */
export const clusterFlags = (helpGroup?: string) => ({
  context: Flags.string({
    summary: 'The kubeconfig context to use (default: its current context).',
    helpValue: 'NAME',
    helpGroup,
  }),
  kubeconfig: Flags.string({
    summary: 'The kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).',
    helpValue: 'FILE',
    helpGroup,
  }),
  'request-timeout': Flags.integer({
    summary: `Seconds to wait for one answer of the API server (default: ${DEFAULT_REQUEST_TIMEOUT_S}).`,
    helpValue: 'SECONDS',
    min: 1,
    helpGroup,
  }),
});

/** `-n NS` or `-A`, for commands that look at a namespace or at all of them. */
export const namespaceFlags = (verb: string) => ({
  namespace: kubeName({
    char: 'n',
    summary: `The namespace to ${verb} (default: the context's, else default).`,
    helpValue: 'NAME',
    exclusive: ['all-namespaces'],
  }),
  'all-namespaces': Flags.boolean({
    char: 'A',
    summary: `${verb[0]!.toUpperCase()}${verb.slice(1)} every namespace.`,
  }),
});

/** The parsed cluster flags (and `-n`), as loadKubeAccess takes them. */
export function kubeAccessOptions(flags: {
  kubeconfig?: string;
  context?: string;
  namespace?: string;
  'request-timeout'?: number;
}): KubeAccessOptions {
  return {
    kubeconfig: flags.kubeconfig,
    context: flags.context,
    namespace: flags.namespace,
    requestTimeoutMs: (flags['request-timeout'] ?? DEFAULT_REQUEST_TIMEOUT_S) * 1000,
  };
}
