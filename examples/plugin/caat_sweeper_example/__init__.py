"""An example caat-sweeper plugin: one method, `trades_ls`, with a knob of its own."""
