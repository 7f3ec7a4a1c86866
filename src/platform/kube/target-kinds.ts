/**
 * What a Kubernetes target can be; also the flags and mirrord.json keys that name one. A module
 * of its own so that the CLI's settings read it without loading the Kubernetes client.
 */
export const TARGET_KINDS = ['pod', 'deployment', 'statefulset'] as const;
export type TargetKind = (typeof TARGET_KINDS)[number];
