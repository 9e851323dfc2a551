"""What an operator watches: metrics no single service owns, and request traces."""
