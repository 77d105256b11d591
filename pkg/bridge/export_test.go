package bridge

// ForwardingOn is forwardingOn, for the test to check the kernel's netlink answer.
var ForwardingOn = forwardingOn
