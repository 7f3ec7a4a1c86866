#!/usr/bin/env node
import process from 'node:process';
import { flush, run } from '@oclif/core';
import { exitWithError } from '../dist/cli/base-command.js';

// oclif's execute() would print what no command caught in its own words (" ›   Error: …").
await run(process.argv.slice(2), import.meta.url).then(() => flush(), exitWithError);
