"""The tools' argument parser: usage errors are one line (exit status 2); --help is unchanged. No imports of
train_gpt here, so tools that do not need torch (plot_logs.py) stay light."""
import argparse


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")
