// demo app placeholder
